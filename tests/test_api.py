"""The Python API: `import tilescan` is light, documented, and the README's example runs."""

from __future__ import annotations

import json
import logging
import os
import pydoc
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import tilescan
from conftest import REPO, scene


def test_import_is_light_and_help_shows_the_api():
    probe = "import sys, tilescan; print(sorted(m for m in ('keras', 'tensorflow', 'rasterio') if m in sys.modules))"
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert res.stdout.strip() == "[]", res.stdout + res.stderr
    text = pydoc.render_doc(tilescan, renderer=pydoc.plaintext)
    for name in ("run", "load_config", "describe_model", "load_model", "explain_figures", "get_cam"):
        assert f"{name}(" in text, name
    assert set(tilescan.__all__) <= set(dir(tilescan))


_DRAWS_PROBE = """
import random, sys
import numpy as np
import tilescan

def draws():
    return float(np.random.rand()), random.random()

np.random.seed(0); random.seed(0); untouched = draws()
for call in (lambda: tilescan.load_model(), lambda: tilescan.run(sys.argv[1], sys.argv[2], bands=[1, 2, 3])):
    np.random.seed(0); random.seed(0)
    call()  # the first imports Keras and loads the model, the second runs with it loaded
    print(draws() == untouched)
"""


def test_a_callers_seeded_draws_do_not_depend_on_tilescan(tmp_path):
    """A notebook seeds Python's random and numpy's global generator, calls tilescan, then
    draws: the same numbers as without tilescan, in a fresh kernel and after (importing
    TensorFlow and loading a Keras model drew from both)."""
    res = subprocess.run([sys.executable, "-c", _DRAWS_PROBE, str(scene("opengeos-naip/m_4709963_se_14_1_20190904.tif")),
                          str(tmp_path / "out")], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.split() == ["True", "True"], res.stdout + res.stderr[-2000:]


def test_a_keyword_set_to_none_is_not_given_whatever_the_config(tmp_path):
    """``target=None``, ``nodata=None``: not given, with a Config object as with a TOML file or
    none (a Config object refused them, "expected a string or a number, got None"); a wrong
    name set to None is still refused."""
    naip = scene("opengeos-naip/m_4709963_se_14_1_20190904.tif")
    cfg = tilescan.load_config(overrides={"tiling": {"bands": [1, 2, 3]}})
    plain = tilescan.run(naip, tmp_path / "plain", config=cfg)
    given = tilescan.run(naip, tmp_path / "none", config=cfg, target=None, nodata=None, tile_size=None)
    assert plain.exit_code == given.exit_code == 0
    made = [json.loads((Path(r.out_dir) / "run.json").read_text())["fingerprint"] for r in (plain.done[0], given.done[0])]
    assert made[0] == made[1]
    with pytest.raises(tilescan.ConfigError, match="unknown setting 'tile_sise'"):
        tilescan.run(naip, tmp_path / "x", config=cfg, tile_sise=None)


def test_run_says_what_it_takes_when_given_pixels_or_a_dict(tmp_path):
    """An array of pixels, None or a dict of settings where paths and a config go: a TypeError
    saying what the function takes (they failed deep inside with "'NoneType' object is not
    iterable" or pathlib's message); a generator of paths (a glob) is taken."""
    one = scene("rio-tiler/cog_rgb.tif")
    for bad in (np.zeros((3, 64, 64), np.uint8), [one, np.zeros(3)]):
        with pytest.raises(TypeError, match=r"run takes scene files, folders or URLs .*use get_cam"):
            tilescan.run(bad, tmp_path / "out")
    with pytest.raises(TypeError, match=r"run takes scene files, folders or URLs \(a path, or a list of them\), got NoneType$"):
        tilescan.run(None, tmp_path / "out")
    with pytest.raises(TypeError, match=r"cut_chips takes scene files or folders .*got int$"):
        tilescan.cut_chips(5, one, tmp_path / "chips")
    with pytest.raises(TypeError, match=r"a config is a Config, a TOML file's path or None, got dict"):
        tilescan.run(one, tmp_path / "out", config={"tiling": {"tile_size": 64}})
    report = tilescan.run(one.parent.glob(one.name), tmp_path / "out")
    assert report.exit_code == 0 and len(report.done) == 1


def test_readme_python_example_runs(tmp_path, monkeypatch, caplog):
    readme = (REPO / "README.md").read_text()
    code = re.search(r"```python\n(import logging, tilescan.*?)```", readme, re.S).group(1)
    rel = "../shared/data/scenes/opengeos-naip/m_4709963_se_14_1_20190904.tif"
    assert rel in code
    code = code.replace(rel, str(scene(rel[len("../shared/data/scenes/"):])))
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    with caplog.at_level(logging.INFO, logger="tilescan"):
        exec(compile(code, "README.md", "exec"), ns)  # noqa: S102 - the README's own example
    report = ns["report"]
    assert report.exit_code == 0 and report.to_dict()["counts"]["done"] == 1
    assert not report.failed and not report.skipped and (Path(report.done[0].out_dir) / "tiles.parquet").is_file()
    # the report a notebook keeps is the one written: the same end time, shard and model, later too
    time.sleep(1.1)
    assert report.to_dict() == json.loads((tmp_path / "out-py" / "report.json").read_text())
    manifest = json.loads((tmp_path / "out-py" / "m_4709963_se_14_1_20190904" / "run.json").read_text())
    assert manifest["config"]["cam"]["method"] == "layercam" and manifest["config"]["tiling"]["tile_size"] == 128
    assert any("tiles classified" in r.getMessage() for r in caplog.records)  # progress reached the logger
    # the scene's warning (4 bands for a 3-band model) as a WARNING record, its level said once
    warned = [r.getMessage() for r in caplog.records if r.name == "tilescan" and r.levelno == logging.WARNING]
    assert any("4 bands" in m for m in warned) and not any(m.startswith("warning") for m in warned)
    # and in the report, as the README tells a user without a logging set-up to read it
    assert any("4 bands" in w["message"] for w in report.to_dict()["done"][0]["warnings"])
    assert ns["card"].scale_range is not None


def test_library_prints_nothing(tmp_path, capsys):
    report = tilescan.run(scene("rio-tiler/cog_rgb.tif"), tmp_path / "o", units="px", tile_size=200)
    assert report.exit_code == 0
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


_QUIET_PROBE = """
import logging, sys, tilescan
cog, plain, image, out, naip = sys.argv[1:]
logging.basicConfig(level=logging.WARNING)  # a user's own handler on stderr
assert tilescan.run(naip, out + "/n").exit_code == 0  # warns (4 bands) while Keras loads
assert tilescan.run(cog, out + "/a", units="px", tile_size=200).exit_code == 0
assert tilescan.run(plain, out + "/b", units="px", tile_size=100, allow_pixel_space=True).exit_code == 0
for k in range(3):  # figures again and again, as a notebook's cell is run
    tilescan.explain_figures(image, out + f"/e{k}", methods="gradcam,layercam")
tilescan.collect(out + "/a")  # with TensorFlow loaded: its SQLite has no R-tree module
from tilescan.outputs.gpkg import has_rtree
assert has_rtree(out + "/a/collected/tiles.gpkg")
"""


def test_library_prints_nothing_to_the_terminal(tmp_path, aid_dir):
    """A fresh process as a notebook's kernel is, with TensorFlow's log level not set and a
    logging handler of the user's on stderr: only tilescan's own warnings reach file
    descriptors 1 and 2 (none lost while Keras loads quietly; no TensorFlow start-up lines,
    retracing notes, GDAL's or pyogrio's warnings on a scene without a CRS), and the process ends without warnings
    of its own (e.g. an unclosed file), with Python's warnings shown; a collect after the run
    has its spatial index without GDAL's error about the R-tree module."""
    import numpy as np
    import rasterio

    plain = tmp_path / "plain.tif"  # no CRS, no transform: a pixel-space scene
    with rasterio.open(plain, "w", driver="GTiff", width=200, height=200, count=3, dtype="uint8") as dst:
        dst.write(np.random.default_rng(0).integers(0, 255, (3, 200, 200), dtype=np.uint8))
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    res = subprocess.run([sys.executable, "-W", "default", "-c", _QUIET_PROBE, str(scene("rio-tiler/cog_rgb.tif")),
                          str(plain), str(aid_dir / "images" / "Pond" / "pond_1.jpg"), str(tmp_path),
                          str(scene("opengeos-naip/m_4709963_se_14_1_20190904.tif"))],
                         capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stderr.splitlines()
    assert res.stdout == "" and all(line.startswith("WARNING:tilescan:") for line in lines), res.stdout + res.stderr
    assert any("scene has 4 bands and the model takes 3" in line for line in lines), lines  # not lost meanwhile


def test_the_api_takes_what_the_command_line_takes(tmp_path, aid_dir):
    """"default" names the packaged model; CAM methods may be comma-separated as on the
    command line; one scene may be given as a string; a wrong shard is a ConfigError, as
    ``--shard`` gives, before anything is made, and so are flat overrides to load_config;
    get_cam takes what load_model returns."""
    assert tilescan.describe_model("default").sha256 == tilescan.describe_model().sha256
    pond = aid_dir / "images" / "Pond" / "pond_1.jpg"
    assert tilescan.explain_figures(pond, tmp_path / "x", model="default")[0].is_file()
    scores = tilescan.evaluate("default", aid_dir, tmp_path / "ev0", split="val", limit=3, explain_samples=0)
    assert scores["model"]["sha256"] == tilescan.describe_model().sha256
    for bad in [(3, 2), (-1, 2), (0, 0), ("0", "2")]:
        with pytest.raises(tilescan.ConfigError, match="0 <= I < N"):
            tilescan.run(scene("rio-tiler/cog_rgb.tif"), tmp_path / "o", shard=bad)
    assert not (tmp_path / "o").exists()
    with pytest.raises(tilescan.ConfigError, match="'nope'"):  # the name, not its first letter
        tilescan.explain_figures(aid_dir / "images" / "Pond" / "pond_1.jpg", tmp_path / "e", methods="gradcam,nope")
    with pytest.raises(tilescan.ConfigError, match="'nope'"):  # before a single image is classified
        tilescan.evaluate("default", aid_dir, tmp_path / "ev", split="val", limit=5, explanations=True,
                          cam_methods="gradcam,nope")
    with pytest.raises(tilescan.InputError, match="input is a folder"):
        tilescan.explain_figures(aid_dir / "images" / "Pond", tmp_path / "e")
    assert not (tmp_path / "e").exists() and not (tmp_path / "ev").exists()  # nothing made for a refused call
    with pytest.raises(tilescan.InputError, match="nowhere.tif: no such file"):
        tilescan.cut_chips(str(tmp_path / "nowhere.tif"), tmp_path / "labels.geojson", tmp_path / "chips")
    with pytest.raises(tilescan.ConfigError, match="by section"):  # not an AttributeError
        tilescan.load_config(None, {"tile_size": 256})
    with pytest.raises(tilescan.ConfigError, match=r"e.g. \{'cam': \{'method'"):  # the key's own section
        tilescan.load_config(None, {"method": "layercam"})
    with pytest.raises(tilescan.ConfigError, match=r"e.g. \{'tiling': \{'min_valid_fraction'"):  # run()'s keyword: its key
        tilescan.load_config(None, {"min_valid": 0.3})
    loaded = tilescan.load_model("default")
    cam = tilescan.get_cam("gradcam", loaded)  # what load_model returns, as a Keras model would be
    assert cam.layer == loaded.cam_layer


def test_what_a_notebook_user_passes_is_taken_or_refused_in_a_line(tmp_path, aid_dir):
    """A loaded model where a model is asked for; ``cam=`` as run and the commands spell it;
    one value for a list that may hold one; a pattern the shell would have expanded, named."""
    rgb = scene("rio-tiler/cog_rgb.tif")
    loaded = tilescan.load_model()
    assert tilescan.run(rgb, tmp_path / "o", model=loaded, tile_size=256).exit_code == 0
    with pytest.raises(tilescan.ConfigError) as exc:
        tilescan.run(rgb, tmp_path / "o2", model=loaded.model)
    assert exc.value.exit_code == 2 and len(str(exc.value)) < 200 and "not a Functional" in str(exc.value)
    pond = aid_dir / "images" / "Pond" / "pond_1.jpg"
    figs = tilescan.explain_figures(pond, tmp_path / "x", cam="gradcam,layercam")
    assert len(figs) == 1 and figs[0].is_file()
    with pytest.raises(tilescan.ConfigError, match="not both"):
        tilescan.explain_figures(pond, tmp_path / "y", cam="gradcam", methods=["layercam"])
    with pytest.raises(TypeError, match="explain_figures takes image or scene file paths .* use get_cam"):
        tilescan.explain_figures(np.zeros((2, 128, 128, 3), np.float32), tmp_path / "y")
    with pytest.raises(TypeError, match=r"explain_figures\(\) got unexpected keyword arguments tile \(it takes .*tiles"):
        tilescan.explain_figures(pond, tmp_path / "y", tile=(0, 0))
    assert tilescan.load_config(None, {"train": {"gsd_m": 5.0}}).train.gsd_m == (5.0,)
    with pytest.raises(tilescan.InputError, match="a pattern: tilescan takes files and folders"):
        tilescan.run(str(rgb.parent / "*.tif"), tmp_path / "o3")


def test_bad_override_is_a_config_error(tmp_path):
    with pytest.raises(tilescan.ConfigError, match="unknown setting 'tile_sise'"):
        tilescan.run(scene("rio-tiler/cog_rgb.tif"), tmp_path / "o", tile_sise=3)
    with pytest.raises(tilescan.ConfigError) as exc:
        tilescan.run(scene("rio-tiler/cog_rgb.tif"), tmp_path / "o", units="feet")
    assert exc.value.exit_code == 2


def test_an_empty_output_path_is_refused_not_the_current_folder(tmp_path, monkeypatch):
    """``out=""`` (an unset variable) wrote a run's outputs and report.json into the current folder."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(tilescan.ConfigError, match=r"^out is None: give a path"):
        tilescan.run(scene("rio-tiler/cog_rgb.tif"), None)
    with pytest.raises(TypeError, match=r"get_cam\(name, model\): the first argument is the method's name \(one of "):
        tilescan.get_cam(tilescan.describe_model(), "gradcam")
    with pytest.raises(tilescan.ConfigError, match=r"an input is empty \(an unset variable\?\)"):
        tilescan.run([scene("rio-tiler/cog_rgb.tif"), ""], tmp_path / "o")
    for call in (lambda: tilescan.run(scene("rio-tiler/cog_rgb.tif"), ""), lambda: tilescan.collect(""),
                 lambda: tilescan.train(tmp_path, ""), lambda: tilescan.explain_figures(scene("rio-tiler/cog_rgb.tif"), " ")):
        with pytest.raises(tilescan.ConfigError, match=r"out is empty \(an unset variable\?\): give a path"):
            call()
    assert list(tmp_path.iterdir()) == []


def test_runs_in_two_threads_check_one_output_folder_each_with_its_own_probe(tmp_path, monkeypatch):
    """Two threads starting runs into one new folder at once: each checks that the folder is
    writable with a file of its own (one probe per process, one thread removing the other's,
    failed a run with 'output folder is not writable: No such file or directory')."""
    import threading
    from pathlib import Path as P

    from tilescan.pipeline import run as run_mod

    both_written = threading.Barrier(2, timeout=10)
    real_unlink = P.unlink

    def unlink(self, *a, **k):  # each thread removes its probe only once both have written theirs
        if ".tilescan-write-test-" in self.name:
            both_written.wait()
        return real_unlink(self, *a, **k)

    monkeypatch.setattr(P, "unlink", unlink)
    errors = []

    def check():
        try:
            run_mod._check_output_dir(tmp_path / "out")
        except Exception as exc:  # noqa: BLE001 - what the thread met is the finding
            errors.append(exc)

    threads = [threading.Thread(target=check) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert errors == [] and list((tmp_path / "out").iterdir()) == []


def test_a_run_leaves_gdals_cache_as_it_found_it(tmp_path, monkeypatch):
    """GDAL's block cache is bounded while a run reads (GDAL_CACHE_MB), then restored: the
    notebook's own rasterio work keeps the cache it had."""
    from rasterio.env import get_gdal_config

    from tilescan.pipeline import run as R

    monkeypatch.delenv("GDAL_CACHEMAX", raising=False)
    before = get_gdal_config("GDAL_CACHEMAX")
    seen = []
    real = R.UnitJob

    def job(*args, **kw):  # each unit's job is made while the run reads
        seen.append(get_gdal_config("GDAL_CACHEMAX"))
        return real(*args, **kw)

    monkeypatch.setattr(R, "UnitJob", job)
    assert tilescan.run(scene("rio-tiler/cog_rgb.tif"), tmp_path / "o").exit_code == 0
    assert seen == [R.GDAL_CACHE_MB * 2**20] != [before]
    assert get_gdal_config("GDAL_CACHEMAX") == before


def test_a_loaded_model_reads_in_a_line_and_evaluate_names_a_wrong_keyword(tmp_path):
    card = tilescan.describe_model()
    assert repr(card) == (f"LoadedModel({card.model_id!r}, 30 classes, 128 px, metadata only, path={card.path!r})")
    with pytest.raises(TypeError, match=r"^evaluate\(\) got unexpected keyword arguments limt \(it takes .*limit"):
        tilescan.evaluate(None, tmp_path, tmp_path / "e", limt=5)


def test_the_commands_have_their_functions():
    """Every command is a function of the public API (the CLI calls these, nothing else)."""
    for name in ("run", "train", "evaluate", "collect", "cut_chips", "explain_figures", "describe_model", "runtime",
                 "parse_shard"):
        assert callable(getattr(tilescan, name)) and name in tilescan.__all__
    assert tilescan.parse_shard("2/5") == (2, 5)
    with pytest.raises(tilescan.ConfigError, match="0 <= I < N"):
        tilescan.parse_shard("5/5")
    rt = tilescan.runtime()
    assert rt["backend"] == "tensorflow" and rt["pipeline"]["setting"] == "auto"


def test_collect_from_python(tmp_path):
    out = tmp_path / "o"
    assert tilescan.run(scene("rio-tiler/cog_rgb.tif"), out, units="px", tile_size=200).exit_code == 0
    summary = tilescan.collect(out, gpkg=False, styles=False)
    import geopandas as gpd

    table = gpd.read_parquet(out / "collected" / "tiles.parquet")
    rows = gpd.read_parquet(out / "cog_rgb" / "tiles.parquet")
    assert summary["tiles"] == len(table) == len(rows) > 0
    assert summary["scenes"]["cog_rgb"]["complete"]
    assert not (out / "collected" / "tiles.gpkg").exists() and not list((out / "collected").glob("*.qgs"))


def test_a_scene_already_complete_keeps_its_warnings_in_the_report(tmp_path):
    """A rerun skips a finished scene: its result still carries the warnings its outputs were
    made with (a service showing "out of the model's scale" lost it on every rerun)."""
    out = tmp_path / "o"
    first = tilescan.run(scene("rasterio/RGB.byte.tif"), out, units="px", tile_size=256)
    again = tilescan.run(scene("rasterio/RGB.byte.tif"), out, units="px", tile_size=256)
    (made,), (kept,) = first.done, again.skipped
    assert "scale_out_of_range" in [w["code"] for w in made.warnings]
    assert kept.warnings == made.warnings
    assert json.loads((out / "report.json").read_text())["skipped"][0]["warnings"] == made.warnings


def test_get_cam_on_a_loaded_model_takes_a_class_name_as_target(tmp_path):
    import numpy as np

    from conftest import tiny_model_file

    lm = tilescan.load_model(tiny_model_file(tmp_path / "m.keras", ["Forest", "River"], 32, seed=1))
    x = np.random.default_rng(0).random((3, 32, 32, 3)).astype(np.float32)
    cam = tilescan.get_cam("gradcam", lm)
    by_name, by_index = cam(x, target="river"), cam(x, target=1)
    assert (by_name.target == 1).all() and np.array_equal(by_name.cam, by_index.cam)
    with pytest.raises(tilescan.ConfigError, match="Forest"):
        cam(x, target="Lake")
    with pytest.raises(ValueError, match="a class name needs the model's classes"):
        tilescan.get_cam("gradcam", lm.model, layer=lm.cam_layer)(x, target="River")


def test_a_model_file_replaced_by_a_copy_with_its_size_and_time_is_the_new_one(tmp_path):
    """A worker that calls run() again after the model file was replaced by another of the same
    size and modification time (cp -p, rsync -t, tar x): the new file is loaded (run.json's
    sha256 is its own), not 'the model file changed while the run started' at every call."""
    import shutil
    import zipfile

    from tilescan.model import PACKAGE_MODEL, file_sha256

    live, other = tmp_path / "live.keras", tmp_path / "other.keras"
    shutil.copy2(PACKAGE_MODEL, live)
    with zipfile.ZipFile(PACKAGE_MODEL) as src, zipfile.ZipFile(other, "w") as dst:
        for info in src.infolist():  # the same members, dated otherwise: the same size, another sha256
            info.date_time = (2020, 1, 1, 0, 0, 0)
            dst.writestr(info, src.read(info.filename))
    assert other.stat().st_size == live.stat().st_size and file_sha256(other) != file_sha256(live)
    kw = dict(units="px", tile_size=200, quicklook=False, gpkg=False, styles=False)
    assert tilescan.run(scene("rio-tiler/cog_rgb.tif"), tmp_path / "a", model=live, **kw).exit_code == 0
    st = live.stat()
    os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(other, live)
    assert tilescan.run(scene("rio-tiler/cog_rgb.tif"), tmp_path / "b", model=live, **kw).exit_code == 0
    made = json.loads((tmp_path / "b" / "cog_rgb" / "run.json").read_text())["model"]["sha256"]
    assert made == file_sha256(live)
