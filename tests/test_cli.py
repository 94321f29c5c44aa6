"""Tests of the ``tilescan`` command line: fast help, exit codes, rerun and --overwrite.

The full matrix of broken inputs lives in tests/test_robustness.py; here are the basics of
issue 2, each through the real click CLI on a real (small) scene.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from tilescan.cli import main

SMALL = "rio-tiler/cog_rgb.tif"  # 383 x 232: one 400 px tile, a few seconds per run
FAST = ["--tile-size", "400", "--no-progress"]
OUTPUTS = ("tiles.parquet", "labels.tif", "heatmap.tif", "run.json", "quicklook.png")


@pytest.fixture(autouse=True)
def _quiet_affine():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Use `@` matmul", PendingDeprecationWarning)
        yield


def invoke(*args, env=None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env, catch_exceptions=False)


def report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


# ------------------------------------------------------------------------------------
# help without TensorFlow


def test_help_does_not_import_tensorflow_or_keras():
    code = (
        "import sys\n"
        "from tilescan.cli import main\n"
        "for args in (['--help'], ['run', '--help'], ['--version'], ['info']):\n"
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


def test_console_script_help():
    exe = Path(sys.executable).with_name("tilescan")
    if not exe.exists():
        pytest.skip("the tilescan console script is not installed next to this python")
    p = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "Usage: tilescan" in p.stdout


# ------------------------------------------------------------------------------------
# exit codes


def test_exit_2_usage_and_config_errors(tmp_path, scene_path):
    scene = scene_path(SMALL)
    out = tmp_path / "out"
    r = invoke("run", scene, "-o", out, "--tile-size", "0")
    assert r.exit_code == 2 and "--tile-size" in r.output
    r = invoke("run", scene)  # no -o
    assert r.exit_code == 2 and "--out" in r.output
    r = invoke("run", scene, "-o", out, "--bands", "red")
    assert r.exit_code == 2 and "3,2,1" in r.output
    bad = tmp_path / "bad.toml"
    bad.write_text("[tiling]\ntile_sise = 3\n")
    r = invoke("run", scene, "-o", out, "--config", bad)
    assert r.exit_code == 2 and str(bad) in r.output and "tile_sise" in r.output
    r = invoke("run", scene, "-o", out, env={"TILESCAN_TILING__STRIDE": "wide"})
    assert r.exit_code == 2 and "TILESCAN_TILING__STRIDE" in r.output
    r = invoke("run", scene, "-o", out, *FAST, "--target", "Volcano")
    assert r.exit_code == 2 and "Volcano" in r.output and "Forest" in r.output
    r = invoke("run", scene, "-o", out, *FAST, "--cam", "nosuchcam")
    assert r.exit_code == 2 and "nosuchcam" in r.output
    assert not (out / scene.stem).exists()


def test_exit_3_some_failed_and_4_all_failed(tmp_path, scene_path):
    scene = scene_path(SMALL)
    broken = tmp_path / "in" / "broken.tif"
    broken.parent.mkdir()
    broken.write_bytes(b"II*\x00" + bytes(200))  # a TIFF header and nothing valid after it
    out = tmp_path / "out"
    r = invoke("run", scene, broken.parent, "-o", out, *FAST)
    assert r.exit_code == 3, r.output
    rep = report(out)
    assert rep["exit_code"] == 3 and rep["counts"] == {"done": 1, "skipped": 0, "failed": 1}
    assert Path(rep["failed"][0]["scene"]) == broken.resolve()
    assert "broken.tif" in rep["failed"][0]["reason"]
    assert all((out / scene.stem / f).is_file() for f in OUTPUTS)  # the good scene was written
    assert not (out / "broken").exists()
    # every scene failed
    out4 = tmp_path / "out4"
    r = invoke("run", broken.parent, "-o", out4, *FAST)
    assert r.exit_code == 4 and report(out4)["counts"]["failed"] == 1
    # nothing to do: an empty folder, a path that does not exist
    empty = tmp_path / "empty"
    empty.mkdir()
    r = invoke("run", empty, "-o", tmp_path / "o5", *FAST)
    assert r.exit_code == 4 and "no *.tif" in r.output
    r = invoke("run", tmp_path / "nowhere.tif", "-o", tmp_path / "o6", *FAST)
    assert r.exit_code == 4 and "nowhere.tif" in r.output


def test_exit_5_model_errors(tmp_path, scene_path):
    scene = scene_path(SMALL)
    noise = tmp_path / "noise.keras"
    noise.write_bytes(np.random.default_rng(0).bytes(1000))
    r = invoke("run", scene, "-o", tmp_path / "o", *FAST, "--model", noise)
    assert r.exit_code == 5 and "noise.keras" in r.output
    r = invoke("run", scene, "-o", tmp_path / "o", *FAST, "--model", tmp_path / "missing.keras")
    assert r.exit_code == 5 and "missing.keras" in r.output and "not found" in r.output
    r = invoke("run", scene, "-o", tmp_path / "o", *FAST, env={"TILESCAN_MODEL": str(noise)})
    assert r.exit_code == 5 and "noise.keras" in r.output
    assert not (tmp_path / "o" / scene.stem).exists()


def test_exit_6_output_errors(tmp_path, scene_path):
    scene = scene_path(SMALL)
    a_file = tmp_path / "not-a-folder"
    a_file.write_text("x")
    # a folder that cannot be created (its parent is a file)
    r = invoke("run", scene, "-o", a_file / "sub", *FAST)
    assert r.exit_code == 6 and "not-a-folder" in r.output
    # -o naming a file is a bad option value: click's usage error
    r = invoke("run", scene, "-o", a_file, *FAST)
    assert r.exit_code == 2 and "not-a-folder" in r.output
    assert a_file.read_text() == "x"


# ------------------------------------------------------------------------------------
# rerun and --overwrite


def _stamp(folder: Path) -> dict:
    return {f: (folder / f).stat().st_ino for f in OUTPUTS} | {"mtime": (folder / "run.json").stat().st_mtime_ns}


def test_rerun_skips_and_overwrite_replaces(tmp_path, scene_path):
    scene = scene_path(SMALL)
    out = tmp_path / "out"
    r = invoke("run", scene, "-o", out, *FAST)
    assert r.exit_code == 0 and report(out)["counts"] == {"done": 1, "skipped": 0, "failed": 0}
    folder = out / scene.stem
    first = _stamp(folder)
    man1 = json.loads((folder / "run.json").read_text())

    # the same command again: nothing recomputed, reported as skipped, files untouched
    r = invoke("run", scene, "-o", out, *FAST)
    assert r.exit_code == 0, r.output
    rep = report(out)
    assert rep["counts"] == {"done": 0, "skipped": 1, "failed": 0}
    assert rep["skipped"][0]["unit"] == scene.stem
    assert _stamp(folder) == first
    # batch size does not shape the results: still skipped
    r = invoke("run", scene, "-o", out, *FAST, "--batch-size", "3")
    assert r.exit_code == 0 and report(out)["counts"]["skipped"] == 1

    # a result-shaping change without --overwrite: refused, old outputs kept (exit 6)
    r = invoke("run", scene, "-o", out, "--tile-size", "256", "--no-progress")
    assert r.exit_code == 6, r.output
    assert "--overwrite" in report(out)["failed"][0]["reason"]
    assert _stamp(folder) == first

    # --overwrite replaces the outputs with fresh files
    r = invoke("run", scene, "-o", out, *FAST, "--overwrite")
    assert r.exit_code == 0 and report(out)["counts"] == {"done": 1, "skipped": 0, "failed": 0}
    second = _stamp(folder)
    assert all(second[f] != first[f] for f in OUTPUTS)
    man2 = json.loads((folder / "run.json").read_text())
    assert man2["fingerprint"] == man1["fingerprint"] and man2["counts"] == man1["counts"]
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [scene.stem, "report.json"]
    assert not [p for p in out.iterdir() if ".old-" in p.name]
