"""Tests of the ``tilescan`` command line: fast help, exit codes, rerun and --overwrite.

The full matrix of broken inputs lives in tests/test_robustness.py; here are the basics of
issue 2, each through the real click CLI on a real (small) scene.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from tilescan.cli import main
from tilescan.config import CAM_METHOD_NAMES
from conftest import OUTPUTS, QUIET_AFFINE, invoke, read_report, scene

SMALL = "rio-tiler/cog_rgb.tif"  # 383 x 232: one 400 px tile, a few seconds per run
FAST = ["--tile-size", "400", "--no-progress"]
pytestmark = QUIET_AFFINE


# ------------------------------------------------------------------------------------
# help without TensorFlow


def test_help_does_not_import_tensorflow_or_keras():
    code = (
        "import sys\n"
        "from tilescan.cli import main\n"
        "for args in (['--help'], ['run', '--help'], ['run', '-v', '--help'], ['train', '--help'], ['evaluate', '--help'],\n"
        "             ['explain', '--help'], ['collect', '--help'], ['--version'], ['info']):\n"
        "    try:\n"
        "        main(args, prog_name='tilescan')\n"
        "    except SystemExit as e:\n"
        "        assert e.code in (0, None), (args, e.code)\n"
        "heavy = sorted(m for m in ('tensorflow', 'keras', 'jax', 'torch') if m in sys.modules)\n"
        "print('HEAVY=' + ','.join(heavy))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 0, p.stderr
    assert "HEAVY=\n" in p.stdout, p.stdout[-2000:]
    # the help really was printed: command list, the run options, exit codes, the model info
    assert "Exit codes" in p.stdout and "run" in p.stdout
    for opt in ("--out", "--model", "--config", "--tile-size", "--stride", "--batch-size", "--overwrite"):
        assert opt in p.stdout
    assert '"classes"' in p.stdout and "Airport" in p.stdout


def test_an_empty_output_path_is_a_usage_error(tmp_path, monkeypatch):
    """``-o "$OUTDIR"`` with the variable unset: exit 2, and nothing written where it runs."""
    monkeypatch.chdir(tmp_path)
    scene_file = scene("rasterio/RGB.byte.tif")
    for args in (["run", scene_file, "-o", ""], ["chips", scene_file, "--labels", "x.gpkg", "-o", " "],
                 ["explain", scene_file, "-o", ""], ["collect", ""]):
        res = CliRunner().invoke(main, [str(a) for a in args])
        assert res.exit_code == 2 and "is empty (an unset variable in a script?)" in res.output, (args, res.output)
    res = CliRunner().invoke(main, ["run", "", str(scene_file), "-o", str(tmp_path / "out")])
    assert res.exit_code == 2 and "an INPUT is empty (an unset variable in a script?)" in res.output, res.output
    assert list(tmp_path.iterdir()) == []


def test_a_tile_size_over_the_limit_names_the_flag(tmp_path):
    res = invoke(["run", scene("rasterio/RGB.byte.tif"), "-o", tmp_path / "out", "--tile-size", "9000", "--no-progress"])
    assert res.exit_code == 4, res.output
    assert ("RGB.byte.tif: tiles would be 9000 px wide, above the 8192 px limit (--tile-size 9000): give a smaller "
            "tile size") in res.output, res.output


def test_an_output_folder_that_is_a_scenes_own_is_refused(tmp_path):
    """-o OUT/<scene> by mistake (tab completion) would nest a run's outputs and report in a
    finished scene's folder: refused naming the folder to give; a folder with a run.json of
    something else is not taken for one."""
    out = tmp_path / "out"
    assert invoke(["run", scene("rio-tiler/cog_rgb.tif"), "-o", out, "--units", "px", "--no-progress"]).exit_code == 0
    res = invoke(["run", scene("rasterio/cogeo.tif"), "-o", out / "cog_rgb", "--units", "px", "--no-progress"])
    assert res.exit_code == 6, res.output
    assert f"{out / 'cog_rgb'}: is a scene's output folder (it holds run.json), not a run's: give the folder that " \
           f"holds it, {out}" in res.output
    assert not (out / "cog_rgb" / "cogeo").exists() and not (out / "cog_rgb" / "report.json").exists()
    banded = tmp_path / "banded"  # a scene done as row bands: its folder holds their folders, no run.json
    (banded / "rows-00000-00002").mkdir(parents=True)
    (banded / "rows-00000-00002" / "run.json").write_bytes((out / "cog_rgb" / "run.json").read_bytes())
    res = invoke(["run", scene("rasterio/cogeo.tif"), "-o", banded, "--units", "px", "--no-progress"])
    assert res.exit_code == 6 and "is a scene's output folder" in res.output, res.output
    other = tmp_path / "job"
    other.mkdir()
    (other / "run.json").write_text('{"job": 1}')  # someone else's
    assert invoke(["run", scene("rasterio/cogeo.tif"), "-o", other, "--units", "px", "--no-progress"]).exit_code == 0


def test_console_script_help():
    exe = Path(sys.executable).with_name("tilescan")
    if not exe.exists():
        pytest.skip("the tilescan console script is not installed next to this python")
    p = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "Usage: tilescan" in p.stdout


# ------------------------------------------------------------------------------------
# info --runtime: the backend and device a run would use


def test_info_shows_a_legend_as_written(tmp_path):
    from conftest import tiny_model_file

    model = tiny_model_file(tmp_path / "m.keras", ["Étang à canards", "Prairie"], 32, seed=0)
    r = invoke(["info", model])
    assert r.exit_code == 0 and '"Étang à canards"' in r.stdout and "\\u00c9" not in r.stdout, r.stdout
    assert json.loads(r.stdout)["classes"] == ["Étang à canards", "Prairie"]
    assert invoke(["info", "--model", model]).stdout == r.stdout  # named as run and chips name it
    assert invoke(["info", model, "--model", model.parent / "." / model.name]).stdout == r.stdout
    r = invoke(["info", "--model", model, tmp_path / "other.keras"])
    assert r.exit_code == 2 and "give the model once" in r.output


def test_info_runtime_shows_backend_device_and_precision():
    from tilescan.backend import cpu_has_bf16

    r = invoke(["info", "--runtime"])
    assert r.exit_code == 0, r.output
    meta = json.loads(r.stdout)
    assert "Airport" in meta["classes"]  # the model metadata, as plain `tilescan info` prints it
    rt = meta["runtime"]
    assert rt["backend"] == "tensorflow" and set(rt) >= {"device", "accelerators", "gpu_visible", "warning"}
    assert rt["precision"]["setting"] == "float32" and rt["precision"]["used"] == "float32"  # the shipped default
    on_cpu = rt["device"] == "cpu"
    assert rt["precision"]["auto"] == ("bf16" if on_cpu and cpu_has_bf16() else "float32")
    assert rt["pipeline"] == {"setting": "auto", "used": "lockstep" if on_cpu else "overlap"}
    from tilescan.backend import usable_cores

    assert rt["model_streams"] == {"setting": "auto", "used": 2 if on_cpu and usable_cores() >= 2 else 1}
    # readers only in the overlap pipeline: none in the CPU's lockstep, as run.json says it (null)
    assert rt["reader_threads"] == {"setting": "auto", "used": None if on_cpu else usable_cores()}
    assert rt["reader_processes"] == {"setting": False, "used": False}
    assert rt["switch_interval_ms"] == {"setting": "auto", "used": 5.0 if on_cpu else 0.5}  # Python's own on a CPU
    if rt["warning"]:  # a GPU this backend cannot use: said on stderr too
        assert rt["warning"] in r.stderr
    else:
        assert "warning" not in r.stderr


def test_info_runtime_resolves_the_config_and_environment(tmp_path):
    cfg = tmp_path / "site.toml"
    cfg.write_text('[inference]\nprecision = "bf16"\n')
    rt = json.loads(invoke(["info", "--runtime", "--config", cfg]).stdout)["runtime"]
    assert rt["precision"]["setting"] == rt["precision"]["used"] == "bf16"
    r = invoke(["info", "--runtime"], env={"TILESCAN_INFERENCE__PIPELINE": "overlap",
                                           "TILESCAN_INFERENCE__MODEL_STREAMS": "1",
                                           "TILESCAN_INFERENCE__READER_THREADS": "3",
                                           "TILESCAN_INFERENCE__READER_PROCESSES": "true",
                                           "TILESCAN_INFERENCE__SWITCH_INTERVAL_MS": "0.25"})
    rt = json.loads(r.stdout)["runtime"]
    assert rt["switch_interval_ms"] == {"setting": "0.25", "used": 0.25}
    assert rt["pipeline"] == {"setting": "overlap", "used": "overlap"}
    assert rt["reader_processes"] == {"setting": True, "used": True}
    assert rt["model_streams"] == {"setting": "1", "used": 1}
    assert rt["reader_threads"] == {"setting": "3", "used": 3}


def test_info_without_runtime_has_no_runtime_and_config_needs_it(tmp_path):
    r = invoke(["info"])
    assert r.exit_code == 0 and "runtime" not in json.loads(r.stdout)
    r = invoke(["info", "--config", tmp_path / "x.toml"])
    assert r.exit_code == 2 and "--config is read only with --runtime" in r.output


# ------------------------------------------------------------------------------------
# exit codes


def test_exit_2_usage_and_config_errors(tmp_path, scene_path):
    scene = scene_path(SMALL)
    out = tmp_path / "out"
    r = invoke(["run", scene, "-o", out, "--tile-size", "0"])
    assert r.exit_code == 2 and "--tile-size" in r.output
    r = invoke(["run", scene])  # no -o
    assert r.exit_code == 2 and "--out" in r.output
    r = invoke(["run", scene, "-o", out, "--bands", "red"])
    assert r.exit_code == 2 and "3,2,1" in r.output
    bad = tmp_path / "bad.toml"
    bad.write_text("[tiling]\ntile_sise = 3\n")
    r = invoke(["run", scene, "-o", out, "--config", bad])
    assert r.exit_code == 2 and str(bad) in r.output and "tile_sise" in r.output
    good = tmp_path / "good.toml"
    good.write_text("[tiling]\nstride = 64\n")
    for cmd in (["run", scene, "-o", out], ["explain", scene, "-o", out], ["info", "--runtime"]):
        r = invoke([*cmd, "--config", good, "--config", bad])  # not the last file alone, unsaid
        assert r.exit_code == 2 and f"'--config': given 2 times ({good}, {bad})" in r.output, r.output
    r = invoke(["run", scene, "-o", out], env={"TILESCAN_TILING__STRIDE": "wide"})
    assert r.exit_code == 2 and "TILESCAN_TILING__STRIDE" in r.output
    r = invoke(["run", scene, "-o", out, *FAST, "--target", "Volcano"])
    assert r.exit_code == 2 and "Volcano" in r.output and "Forest" in r.output
    r = invoke(["run", scene, "-o", tmp_path / "eigen", *FAST, "--target", "Forest", "--cam", "eigencam"])
    assert r.exit_code == 0 and "--target Forest changes nothing with eigencam" in r.output, r.output
    r = invoke(["run", scene, "-o", out, *FAST, "--cam", "nosuchcam"])
    assert r.exit_code == 2 and "nosuchcam" in r.output
    # a CAM layer the model has not: named as the user set it
    for args, env, said in ((["--cam-layer", "nolayer"], None, "--cam-layer nolayer: CAM layer 'nolayer' is not a layer"),
                            ([], {"TILESCAN_CAM__LAYER": "nolayer"}, "TILESCAN_CAM__LAYER=nolayer: CAM layer 'nolayer'")):
        r = invoke(["run", scene, "-o", out, *FAST, *args], env=env)
        assert r.exit_code == 2 and said in r.output, r.output
    # bands the model cannot take: refused once, before any scene (not each scene failed, exit 4)
    r = invoke(["run", scene, scene_path(SMALL), "-o", out, *FAST, "--bands", "1,2"])
    assert r.exit_code == 2 and r.output.count("--bands 1,2 lists 2 band(s), but the model expects 3") == 1, r.output
    assert not (out / scene.stem).exists()


def test_exit_3_some_failed_and_4_all_failed(tmp_path, scene_path):
    scene = scene_path(SMALL)
    broken = tmp_path / "in" / "broken.tif"
    broken.parent.mkdir()
    broken.write_bytes(b"II*\x00" + bytes(200))  # a TIFF header and nothing valid after it
    out = tmp_path / "out"
    r = invoke(["run", scene, broken.parent, "-o", out, *FAST])
    assert r.exit_code == 3, r.output
    rep = read_report(out)
    assert rep["exit_code"] == 3 and rep["counts"] == {"done": 1, "skipped": 0, "failed": 1}
    assert Path(rep["failed"][0]["scene"]) == broken.resolve()
    assert "broken.tif" in rep["failed"][0]["reason"]
    assert all((out / scene.stem / f).is_file() for f in OUTPUTS)  # the good scene was written
    assert not (out / "broken").exists()
    # every scene failed
    out4 = tmp_path / "out4"
    r = invoke(["run", broken.parent, "-o", out4, *FAST])
    assert r.exit_code == 4 and read_report(out4)["counts"]["failed"] == 1
    # nothing to do: an empty folder, a path that does not exist
    empty = tmp_path / "empty"
    empty.mkdir()
    r = invoke(["run", empty, "-o", tmp_path / "o5", *FAST])
    assert r.exit_code == 4 and "no *.tif" in r.output
    r = invoke(["run", tmp_path / "nowhere.tif", "-o", tmp_path / "o6", *FAST])
    assert r.exit_code == 4 and "nowhere.tif" in r.output
    assert not (tmp_path / "o5").exists() and not (tmp_path / "o6").exists()
    # into the first run's OUT: its report is replaced by this run's, its scene kept
    r = invoke(["run", empty, "-o", out, *FAST])
    assert r.exit_code == 4
    rep = read_report(out)
    assert rep["exit_code"] == 4 and rep["counts"] == {"done": 0, "skipped": 0, "failed": 0}
    assert rep["error"]["kind"] == "no-scenes" and f"no *.tif / *.tiff scenes found in {empty}" in rep["error"]["message"]
    assert all((out / scene.stem / f).is_file() for f in OUTPUTS)
    r = invoke(["run", tmp_path / "nowhere.tif", "-o", out, *FAST])  # the input named, as when others exist
    rep = read_report(out)
    assert r.exit_code == 4 and rep["exit_code"] == 4 and rep["counts"]["failed"] == 1
    assert rep["failed"][0]["scene"] == str(tmp_path / "nowhere.tif")
    assert rep["failed"][0]["reason"].endswith("nowhere.tif: no such file or directory")


def test_exit_5_model_errors(tmp_path, scene_path):
    scene = scene_path(SMALL)
    noise = tmp_path / "noise.keras"
    noise.write_bytes(np.random.default_rng(0).bytes(1000))
    r = invoke(["run", scene, "-o", tmp_path / "o", *FAST, "--model", noise])
    assert r.exit_code == 5 and "noise.keras" in r.output
    r = invoke(["run", scene, "-o", tmp_path / "o", *FAST, "--model", tmp_path / "missing.keras"])
    assert r.exit_code == 5 and "missing.keras" in r.output and "not found" in r.output
    assert not (tmp_path / "o").exists()  # not made for a run that cannot start
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "report.json").write_text('{"exit_code": 0}')  # an earlier run's
    r = invoke(["run", scene, "-o", tmp_path / "o", *FAST], env={"TILESCAN_MODEL": str(noise)})
    assert r.exit_code == 5 and "noise.keras" in r.output
    assert not (tmp_path / "o" / scene.stem).exists()
    rep = read_report(tmp_path / "o")  # this run's report replaced it, and says why nothing was done
    assert rep["exit_code"] == 5 and rep["error"]["kind"] == "model" and "noise.keras" in rep["error"]["message"]
    assert rep["counts"] == {"done": 0, "skipped": 0, "failed": 0}


def test_a_shard_says_which_it_is_and_its_report_names_folders_in_full(tmp_path, scene_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = invoke(["run", scene_path(SMALL), "-o", "out", *FAST, "--shard", "0/2"])
    assert r.exit_code == 0 and "shard 0/2: " in r.output, r.output
    rep = read_report(tmp_path / "out", "report-shard-0000-of-0002.json")
    assert all(Path(u["out_dir"]).is_absolute() and Path(u["out_dir"]).is_dir() for u in rep["done"]), rep["done"]


def test_asset_is_for_stac_items(tmp_path, scene_path):
    r = invoke(["run", scene_path(SMALL), "-o", tmp_path / "a", *FAST, "--asset", ""])
    assert r.exit_code == 2 and "give asset keys" in r.output and not (tmp_path / "a").exists()
    r = invoke(["run", scene_path(SMALL), "-o", tmp_path / "b", *FAST, "--asset", "visual"])
    assert r.exit_code == 0 and "--asset picks assets of STAC items" in r.output and "ignored" in r.output


def test_settings_that_do_not_hold_replace_the_report_too(tmp_path, scene_path):
    """A bad setting (a flag, a TILESCAN_* variable, the Python API's keyword) stops the run
    before it starts: OUT's report, an earlier run's, is replaced by one that says why (the
    shard's own report for a sharded run), so a monitor never reads yesterday's success."""
    import tilescan

    scene, out = scene_path(SMALL), tmp_path / "o"
    out.mkdir()
    earlier = '{"exit_code": 0}'
    (out / "report.json").write_text(earlier)
    (out / "report-shard-0001-of-0002.json").write_text(earlier)
    r = invoke(["run", scene, "-o", out, *FAST, "--stride", "1000"])
    rep = read_report(out)
    assert r.exit_code == 2 and rep["exit_code"] == 2 and rep["error"]["kind"] == "config"
    assert rep["error"]["message"].startswith("--stride 1000: must not exceed")
    r = invoke(["run", scene, "-o", out, *FAST, "--shard", "1/2"], env={"TILESCAN_TILING__MIN_VALID_FRACTION": "lots"})
    rep = read_report(out, "report-shard-0001-of-0002.json")
    assert r.exit_code == 2 and rep["exit_code"] == 2 and "TILESCAN_TILING__MIN_VALID_FRACTION" in rep["error"]["message"]
    (out / "report.json").write_text(earlier)
    with pytest.raises(tilescan.ConfigError):
        tilescan.run(scene, out, tile_size=-1)
    assert read_report(out)["error"]["kind"] == "config"
    # values the option parser refuses (a range, a choice), whichever way OUT and the shard are spelled
    for args, report in (([f"-o{out}", "--tile-size", "0"], "report.json"),
                         (["--units", "km", f"--out={out}", "--shard", "1/2"], "report-shard-0001-of-0002.json")):
        (out / report).write_text(earlier)
        r = invoke(["run", scene, *args])
        rep = read_report(out, report)
        assert r.exit_code == 2 and rep["exit_code"] == 2 and rep["error"]["kind"] == "config", (args, rep)
        assert ("--tile-size" if "--tile-size" in args else "--units") in rep["error"]["message"]
    assert not (out / scene.stem).exists()


def test_exit_6_output_errors(tmp_path, scene_path):
    scene = scene_path(SMALL)
    a_file = tmp_path / "not-a-folder"
    a_file.write_text("x")
    # a folder that cannot be created (its parent is a file)
    r = invoke(["run", scene, "-o", a_file / "sub", *FAST])
    assert r.exit_code == 6 and "not-a-folder" in r.output
    # -o naming a file: the same kind of error, the file untouched
    r = invoke(["run", scene, "-o", a_file, *FAST])
    assert r.exit_code == 6 and "not-a-folder: output path exists and is not a folder" in r.output
    assert a_file.read_text() == "x"


def test_every_command_says_when_its_output_folder_cannot_be_made(tmp_path, aid_dir, scene_path):
    """Under a file, or a file itself: exit 6 and the same words from train, explain, evaluate
    and chips as from run, not a traceback or click's usage error."""
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    pond = aid_dir / "images" / "Pond" / "pond_1.jpg"
    for args, made in ((["train", aid_dir, "--limit", "2", "--epochs", "1", "-o", a_file / "m.keras"], "m.ckpt"),
                       (["explain", pond, "-o", a_file / "sub"], "sub"),
                       (["evaluate", "default", aid_dir, "--limit", "2", "-o", a_file / "sub"], "sub")):
        r = invoke(args)
        assert r.exit_code == 6, (args[0], r.output)
        assert f"{a_file / made}: cannot create the output folder: Not a directory" in r.output, r.output
    # -o naming the file itself: exit 6 and tilescan's words, as run gives (not click's usage error)
    labels = tmp_path / "l.geojson"
    labels.write_text('{"type": "FeatureCollection", "features": [{"type": "Feature", "properties": {"class": "a"}, '
                      '"geometry": {"type": "Point", "coordinates": [-99.8, 47.1]}}]}')
    for args in (["explain", pond, "-o", a_file], ["evaluate", "default", aid_dir, "--limit", "2", "-o", a_file],
                 ["chips", scene_path(SMALL), "--labels", labels, "-o", a_file]):
        r = invoke(args)
        assert r.exit_code == 6 and f"{a_file}: " in r.output and "exists and is not a folder" in r.output, r.output
    assert a_file.read_text() == "x"


# ------------------------------------------------------------------------------------
# rerun and --overwrite


def _stamp(folder: Path) -> dict:
    return {f: (folder / f).stat().st_ino for f in OUTPUTS} | {"mtime": (folder / "run.json").stat().st_mtime_ns}


def test_rerun_skips_and_overwrite_replaces(tmp_path, scene_path):
    scene = scene_path(SMALL)
    out = tmp_path / "out"
    r = invoke(["run", scene, "-o", out, *FAST])
    assert r.exit_code == 0 and read_report(out)["counts"] == {"done": 1, "skipped": 0, "failed": 0}
    folder = out / scene.stem
    first = _stamp(folder)
    man1 = json.loads((folder / "run.json").read_text())

    # the same command again: nothing recomputed, reported as skipped, files untouched
    r = invoke(["run", scene, "-o", out, *FAST])
    assert r.exit_code == 0, r.output
    rep = read_report(out)
    assert rep["counts"] == {"done": 0, "skipped": 1, "failed": 0}
    assert rep["skipped"][0]["unit"] == scene.stem
    assert _stamp(folder) == first
    # batch size does not shape the results: still skipped
    r = invoke(["run", scene, "-o", out, *FAST, "--batch-size", "3"])
    assert r.exit_code == 0 and read_report(out)["counts"]["skipped"] == 1

    # a result-shaping change without --overwrite: refused, old outputs kept (exit 6)
    r = invoke(["run", scene, "-o", out, "--tile-size", "256", "--no-progress"])
    assert r.exit_code == 6, r.output
    assert "--overwrite" in read_report(out)["failed"][0]["reason"]
    assert _stamp(folder) == first

    # --overwrite replaces the outputs with fresh files
    r = invoke(["run", scene, "-o", out, *FAST, "--overwrite"])
    assert r.exit_code == 0 and read_report(out)["counts"] == {"done": 1, "skipped": 0, "failed": 0}
    second = _stamp(folder)
    assert all(second[f] != first[f] for f in OUTPUTS)
    man2 = json.loads((folder / "run.json").read_text())
    assert man2["fingerprint"] == man1["fingerprint"] and man2["counts"] == man1["counts"]
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [scene.stem, "report.json"]
    assert not [p for p in out.iterdir() if ".old-" in p.name]


# ------------------------------------------------------------------------------------
# help that shows every default; -v/-q on either side of the command


def help_text(*cmd: str) -> str:
    r = CliRunner().invoke(main, [*cmd, "--help"], terminal_width=300, max_content_width=300, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return r.output


def shown_default(text: str, option: str) -> str:
    """The ``[default: ...]`` in the help of ``option`` (its lines up to the next option)."""
    lines = text.splitlines()
    i = next(i for i, ln in enumerate(lines) if re.match(rf"\s+(-\w, )?{re.escape(option)}\b", ln))
    block = [lines[i], *itertools.takewhile(lambda ln: ln.strip() and not ln.lstrip().startswith("-"), lines[i + 1:])]
    m = re.search(r"\[(?:env var: [^;]*; )?default: ([^;\]]+)", " ".join(block))
    assert m, f"no default shown for {option}: {block!r}"
    return m.group(1)


def test_run_and_train_help_show_the_config_defaults():
    """Options that defer to the config layers show the values of configs/default.toml."""
    toml = tomllib.loads((Path(__file__).resolve().parents[1] / "configs" / "default.toml").read_text())
    run_help = help_text("run")
    want = {
        "--tile-size": toml["tiling"]["tile_size"], "--stride": toml["tiling"]["stride"],
        "--min-valid": toml["tiling"]["min_valid_fraction"], "--batch-size": toml["inference"]["batch_size"],
        "--threads": toml["inference"]["reader_threads"], "--cam": toml["cam"]["method"],
        "--heatmap-scale": toml["output"]["heatmap_scale"],
    }
    for opt, value in want.items():
        assert shown_default(run_help, opt) == str(value), opt
    assert shown_default(run_help, "--gpkg") == ("gpkg" if toml["output"]["gpkg"] else "no-gpkg")
    for opt in ("--model", "--bands", "--cam-layer", "--target", "--shard", "--progress", "--overwrite", "--allow-pixel-space"):
        assert shown_default(run_help, opt)
    # the epilog says where values not given come from
    flat = " ".join(run_help.split())
    assert "TILESCAN_<SECTION>__<KEY>" in flat and "--config file" in flat and "configs/default.toml" in flat

    train_help = help_text("train")
    for opt, key in {"--epochs": "epochs", "--batch-size": "batch_size", "--image-size": "image_size",
                     "--lr": "learning_rate", "--patience": "patience"}.items():
        assert shown_default(train_help, opt) == str(toml["train"][key]), opt


@pytest.mark.parametrize("cmd,defaults", [
    ("evaluate", {"--split": "test", "--batch-size": "64", "--explain-samples": "8", "--cam": "gradcam"}),
    ("explain", {"--cam": "gradcam", "--top": "4"}),
    ("collect", {"--gpkg": "gpkg"}),
])
def test_every_command_help_shows_defaults(cmd, defaults):
    text = help_text(cmd)
    for opt, value in defaults.items():
        assert shown_default(text, opt) == value, (cmd, opt)
    for opt in ("-v", "-q"):  # documented on the command itself
        assert re.search(rf"^\s+{opt}, --\w+ .*before or after the command", text, re.M), (cmd, opt)


@pytest.mark.parametrize("cmd", ["run", "explain", "evaluate"])
def test_help_lists_the_cam_methods_and_one_spelling(cmd):
    text = help_text(cmd)
    cam_line = next(ln for ln in text.splitlines() if re.match(r"\s+--cam\b", ln))
    assert all(m in cam_line for m in CAM_METHOD_NAMES), cam_line
    # the old spellings are accepted (tested below) but not advertised
    assert "--cam-methods" not in text and not re.search(r"\s--layer\b", text)


def test_cam_method_names_match_the_registry():
    from tilescan.explain.cam import CAM_METHODS

    assert tuple(CAM_METHODS) == CAM_METHOD_NAMES


def test_verbosity_flags_before_and_after_the_command(tmp_path, scene_path):
    scene = scene_path(SMALL)
    out = tmp_path / "out"
    r = invoke(["run", scene, "-o", out, *FAST, "-v"])  # after the command: the user's trial
    assert r.exit_code == 0, r.output
    assert "done: 1 written" in r.output
    # reruns (skipped, fast): -q hides the summary line on either side; the counts add up
    r = invoke(["run", scene, "-o", out, *FAST, "-q"])
    assert r.exit_code == 0 and "done:" not in r.output
    r = invoke(["-q", "run", scene, "-o", out, *FAST])
    assert r.exit_code == 0 and "done:" not in r.output
    r = invoke(["-q", "run", scene, "-o", out, *FAST, "-v"])  # -1 + 1 = normal output
    assert r.exit_code == 0 and "done: 0 written, 1 already complete" in r.output
    r = invoke(["-v", "run", scene, "-o", out, *FAST, "-qq"])
    assert r.exit_code == 0 and "done:" not in r.output


def test_a_warning_alike_for_many_scenes_is_printed_thrice_then_counted(tmp_path, scene_path):
    """Pre-tiled chips of one sensor printed the same warning once per chip (272 lines in a
    cron log): alike but for the scene it names, it is printed FOLD_AFTER times and then
    counted in one line at the end; -v prints each; a rerun names no skipped scene without -v."""
    from tilescan.cli.options import FOLD_AFTER

    scenes = tmp_path / "in"
    scenes.mkdir()
    for i in range(FOLD_AFTER + 2):
        shutil.copyfile(scene_path(RGB_BYTE), scenes / f"r{i}.tif")
    args = ["run", scenes, "-o", tmp_path / "out", "--no-quicklook", "--no-gpkg", "--no-styles", "--no-progress"]
    r = invoke(args)
    assert r.exit_code == 0, r.output
    coarser = [line for line in r.output.splitlines() if "coarser than the model's range" in line]
    assert len(coarser) == FOLD_AFTER + 1, coarser
    assert coarser[-1].startswith("warning: 2 more alike, not printed (-v prints each") and "the first: " in coarser[-1]
    assert f"r{FOLD_AFTER}.tif" in coarser[-1] and f"r{FOLD_AFTER + 1}.tif" not in coarser[-1]
    assert all(f"r{i}.tif" in coarser[i] for i in range(FOLD_AFTER))
    r = invoke([*args, "--overwrite", "-v"])
    assert sum("coarser than the model's range" in line for line in r.output.splitlines()) == FOLD_AFTER + 2
    r = invoke(args)
    assert "already complete" not in r.output.replace("5 already complete", "") and "done: 0 written" in r.output
    r = invoke([*args, "-v"])
    assert sum("already complete, skipped" in line for line in r.output.splitlines()) == FOLD_AFTER + 2
    # another tile size without --update: each scene refused with the same error, folded as warnings are
    r = invoke([*args, "--tile-size", "64"])
    refused = [line for line in r.output.splitlines() if "made with other settings" in line]
    assert r.exit_code == 6 and len(refused) == FOLD_AFTER + 1, r.output
    assert refused[-1].startswith("error: 2 more alike, not printed (-v prints each; report.json lists each failed "
                                  f"scene), the first: {tmp_path / 'out' / f'r{FOLD_AFTER}'}: finished outputs"), refused
    assert len(read_report(tmp_path / "out")["failed"]) == FOLD_AFTER + 2


def test_scenes_listed_in_a_file_or_on_stdin_run_as_one_batch(tmp_path, scene_path, monkeypatch):
    """More chips than a command line holds (xargs split them over runs that each replaced
    report.json): --scenes-from FILE runs every one listed, relative paths from the current
    folder, with the INPUTs given too; - reads the list from standard input (a UTF-8 BOM, as
    Windows tools write one, is no part of the first name), NUL-separated too (find -print0); a
    list without a scene, or not UTF-8, is refused before any work, and OUT's report says so (not
    the last run's outcome); a name with a space at its end is said to have one."""
    src = tmp_path / "in"
    src.mkdir()
    for name in ("a b.tif", "c.tif", "given.tif"):
        shutil.copyfile(scene_path(RGB_BYTE), src / name)
    listing = tmp_path / "list.txt"
    listing.write_text("in/a b.tif\n\n" + str(src / "c.tif") + "\r\nin/gone.tif\n")
    monkeypatch.chdir(tmp_path)
    fast = ["--no-quicklook", "--no-gpkg", "--no-styles", "--no-progress", "--tile-size", "256", "--units", "px"]
    r = invoke(["run", src / "given.tif", "--scenes-from", listing, "-o", tmp_path / "out", *fast])
    rep = read_report(tmp_path / "out")
    assert r.exit_code == 3 and sorted(d["unit"] for d in rep["done"]) == ["a b", "c", "given"], r.output
    assert [f["scene"] for f in rep["failed"]] == ["in/gone.tif"], rep["failed"]
    r = CliRunner().invoke(main, ["run", "--scenes-from", "-", "-o", str(tmp_path / "out2"), *fast],
                           input="\ufeffin/c.tif\n", catch_exceptions=False)
    assert r.exit_code == 0 and [d["unit"] for d in read_report(tmp_path / "out2")["done"]] == ["c"], r.output
    # NUL-separated, as find -print0 writes it (a newline may be part of a name there)
    r = CliRunner().invoke(main, ["run", "--scenes-from", "-", "-o", str(tmp_path / "out3"), *fast],
                           input="in/a b.tif\0in/c.tif\0", catch_exceptions=False)
    assert r.exit_code == 0 and sorted(d["unit"] for d in read_report(tmp_path / "out3")["done"]) == ["a b", "c"], r.output
    r = invoke(["run", "in/c.tif ", "-o", tmp_path / "out3", *fast])  # a space the list's line ended with
    assert r.exit_code == 4 and "in/c.tif : no such file or directory (the name begins or ends with a space; " \
        "in/c.tif is there)" in r.output, r.output
    (tmp_path / "blank.txt").write_text("\n  \n")
    (tmp_path / "wide.txt").write_text("in/c.tif\n", encoding="utf-16")
    (tmp_path / "cjk.txt").write_text("影像/场景一.tif\n影像/场景二.tif\n", encoding="utf-16-le")  # no mark, few NULs
    for listing, said in (("blank.txt", "blank.txt lists no scene"), ("wide.txt", "wide.txt is not a list of UTF-8 text"),
                          ("cjk.txt", "cjk.txt is not a list of UTF-8 text")):
        r = invoke(["run", "--scenes-from", tmp_path / listing, "-o", tmp_path / "out2"])
        rep = read_report(tmp_path / "out2")
        assert r.exit_code == 2 and said in r.output and rep["exit_code"] == 2 and said in rep["error"]["message"], \
            (r.output, rep)


def test_warnings_alike_but_for_their_figures_are_folded_too(monkeypatch):
    """Each scene's share of data left below min_valid differs: alike but for the scene and
    its figure, they fold as the same warning does; another warning is not folded with them."""
    import logging

    from tilescan.cli.options import FOLD_AFTER, _CliHandler

    shown: list[str] = []
    monkeypatch.setattr(_CliHandler, "_echo", staticmethod(shown.append))
    handler = _CliHandler(type("Ctx", (), {"verbosity": 0})())
    for i in range(FOLD_AFTER + 3):
        msg = f"s{i}.tif: {3 + i * 1.7:.1f}% of the scene's data lies in tiles below min_valid_fraction 0.5"
        handler.emit(logging.LogRecord("tilescan", logging.WARNING, "", 0, msg, None, None))
    handler.emit(logging.LogRecord("tilescan", logging.WARNING, "", 0, "s9.tif: another thing 5", None, None))
    for i in range(FOLD_AFTER):  # an error with the same words is counted apart from the warning
        handler.emit(logging.LogRecord("tilescan", logging.ERROR, "", 0, f"e{i}.tif: another thing 5", None, None))
    handler.say_folded()
    assert shown[FOLD_AFTER + 1:-1] == [f"error: e{i}.tif: another thing 5" for i in range(FOLD_AFTER)]
    del shown[FOLD_AFTER + 1:-1]
    assert len(shown) == FOLD_AFTER + 2 and shown[FOLD_AFTER].endswith("another thing 5")
    assert shown[-1].startswith("warning: 3 more alike, not printed") and shown[-1].endswith(
        f"the first: s{FOLD_AFTER}.tif: {3 + FOLD_AFTER * 1.7:.1f}% of the scene's data lies in tiles below min_valid_fraction 0.5")


# ------------------------------------------------------------------------------------
# errors about a value name the flag, variable or file it came from

RGB_BYTE = "rasterio/RGB.byte.tif"  # 3 bands


def test_bands_error_names_the_flag(tmp_path, scene_path):
    scene = scene_path(RGB_BYTE)
    out = tmp_path / "out"
    r = invoke(["run", scene, "--bands", "4,2,1", "-o", out, "--no-progress"])
    assert r.exit_code == 4, r.output
    said = "--bands 4,2,1 names band 4, but the scene has 3 band(s)"
    assert said in r.output and "[tiling]" not in r.output
    (failed,) = read_report(out)["failed"]
    assert said in failed["reason"] and str(scene.resolve()) in failed["reason"]


def test_bands_error_names_the_config_file_or_variable(tmp_path, scene_path):
    scene = scene_path(RGB_BYTE)
    cfg = tmp_path / "my.toml"
    cfg.write_text("[tiling]\nbands = [4, 2, 1]\n")
    r = invoke(["run", scene, "--config", cfg, "-o", tmp_path / "o1", "--no-progress"])
    assert r.exit_code == 4, r.output
    said = f"[tiling] bands = [4, 2, 1] in {cfg} names band 4"
    assert said in r.output and said in read_report(tmp_path / "o1")["failed"][0]["reason"]
    r = invoke(["run", scene, "-o", tmp_path / "o2", "--no-progress"], env={"TILESCAN_TILING__BANDS": "4,2,1"})
    assert r.exit_code == 4, r.output
    assert "TILESCAN_TILING__BANDS=4,2,1 names band 4" in read_report(tmp_path / "o2")["failed"][0]["reason"]
    # the flag wins over the file, and the message names the flag
    r = invoke(["run", scene, "--config", cfg, "--bands", "5,2,1", "-o", tmp_path / "o3", "--no-progress"])
    assert "--bands 5,2,1 names band 5" in r.output and str(cfg) not in r.output


def test_stride_error_names_both_flags(tmp_path, scene_path):
    scene = scene_path(SMALL)
    r = invoke(["run", scene, "-o", tmp_path / "o", "--stride", "100", "--tile-size", "64"])
    assert r.exit_code == 2 and "--stride 100: must not exceed --tile-size 64" in r.output
    cfg = tmp_path / "c.toml"
    cfg.write_text("[tiling]\ntile_size = 64\n")
    r = invoke(["run", scene, "-o", tmp_path / "o", "--stride", "100", "--config", cfg])
    assert r.exit_code == 2 and f"--stride 100: must not exceed tile_size ([tiling] tile_size = 64 in {cfg})" in r.output
    assert not (tmp_path / "o").exists()


def test_unknown_cam_methods_name_the_flag(tmp_path, scene_path, aid_dir):
    r = invoke(["run", scene_path(SMALL), "-o", tmp_path / "o", "--cam", "gradcan"])
    assert r.exit_code == 2 and "'--cam'" in r.output and "gradcam++" in r.output
    r = invoke(["explain", scene_path(SMALL), "-o", tmp_path / "o", "--cam", "gradcam,nope"])
    assert r.exit_code == 2 and "'--cam'" in r.output and "'nope'" in r.output and "scorecam" in r.output
    r = invoke(["evaluate", "default", aid_dir, "-o", tmp_path / "o", "--cam", "eigen"])
    assert r.exit_code == 2 and "'--cam'" in r.output and "eigencam" in r.output
    cfg = tmp_path / "c.toml"
    cfg.write_text('[cam]\nmethod = "gradcan"\n')
    r = invoke(["run", scene_path(SMALL), "-o", tmp_path / "o", "--config", cfg])
    assert r.exit_code == 2 and f"{cfg}: [cam] method: must be one of gradcam" in r.output
    assert not (tmp_path / "o").exists()


def test_old_option_spellings_still_work(tmp_path, scene_path, aid_dir):
    # evaluate --cam-methods: validated like --cam, and refused next to it
    r = invoke(["evaluate", "default", aid_dir, "-o", tmp_path / "e", "--cam-methods", "gradcam,nope"])
    assert r.exit_code == 2 and "'--cam-methods'" in r.output and "'nope'" in r.output
    r = invoke(["evaluate", "default", aid_dir, "-o", tmp_path / "e", "--cam-methods", "eigencam", "--cam", "gradcam"])
    assert r.exit_code == 2 and "--cam-methods is the old spelling of --cam" in r.output
    # explain --layer reaches the CAM: the figure's metadata records that layer
    r = invoke(["explain", scene_path(SMALL), "-o", tmp_path / "x", "--layer", "conv4_block2_out", "--top", "1", "--tile-size", "400", "--units", "px"])
    assert r.exit_code == 0, r.output
    (meta,) = (tmp_path / "x").glob("*.json")
    assert json.loads(meta.read_text())["layer"] == "conv4_block2_out"


def test_explain_tiles_given_once_or_several_times(tmp_path, scene_path):
    """``--tiles 0,0 --tiles '1,1;0,1'``: every tile named, in the order given (not the last
    option alone); a pair that is not ROW,COL is a usage error naming the option."""
    r = invoke(["explain", scene_path(SMALL), "-o", tmp_path / "x", "--tiles", "0,0", "--tiles", "1,1;0,1",
                "--tile-size", "100", "--units", "px"])
    assert r.exit_code == 0, r.output
    (meta,) = (tmp_path / "x").glob("*.json")
    assert [row["tile"] for row in json.loads(meta.read_text())["rows"]] == [[0, 0], [1, 1], [0, 1]]
    r = invoke(["explain", scene_path(SMALL), "-o", tmp_path / "y", "--tiles", "0,0", "--tiles", "1"])
    assert r.exit_code == 2 and "'--tiles'" in r.output and "'1'" in r.output


def test_a_setting_a_file_or_variable_turns_on_is_turned_off_by_its_flag(tmp_path, scene_path):
    """overwrite = true in a config file or a TILESCAN_* variable redid every finished scene at
    each rerun, with no flag to say otherwise: --no-overwrite (as --no-update, and
    --no-allow-pixel-space) wins, flags over variables over files."""
    out = tmp_path / "out"
    args = ["run", scene_path(RGB_BYTE), "-o", out, "--no-progress", "--tile-size", "256", "--units", "px"]
    assert invoke(args).exit_code == 0
    (tmp_path / "c.toml").write_text("[output]\noverwrite = true\nupdate = true\n[tiling]\nallow_pixel_space = true\n")
    r = invoke([*args, "--config", tmp_path / "c.toml", "--no-overwrite", "--no-update", "--no-allow-pixel-space"],
               env={"TILESCAN_OUTPUT__OVERWRITE": "true"})
    assert r.exit_code == 0 and "done: 0 written, 1 already complete" in r.output, r.output
    config = read_report(out)["config"]
    assert not config["output"]["overwrite"] and not config["output"]["update"] and not config["tiling"]["allow_pixel_space"]
    r = invoke(args, env={"TILESCAN_OUTPUT__OVERWRITE": "true"})
    assert r.exit_code == 0 and "done: 1 written" in r.output, r.output
