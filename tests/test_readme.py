"""The README's quick start and its Python snippet work as written."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import matplotlib
from click.testing import CliRunner

from tilescan.cli import main

from conftest import REPO, scene

README = (REPO / "README.md").read_text()


def _quick_start_args() -> list[str]:
    cmd = re.search(r"```bash\n(python3 -m venv .*?)\n```", README).group(1)
    run = cmd.split("&&")[-1].strip()
    argv = shlex.split(run)
    assert argv[0].endswith("tilescan") and argv[1] == "run", run
    return argv[1:]


def test_quick_start_then_python_snippet(tmp_path, monkeypatch):
    args = _quick_start_args()
    # the scene path is relative to the clone: point it at the real data wherever it is
    rel = next(a for a in args if a.startswith("../shared/data/scenes/"))
    args[args.index(rel)] = str(scene(rel[len("../shared/data/scenes/"):]))
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(main, [*args, "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "model's range" not in res.output and "scale" not in res.output  # at the model's scale: no scale warning
    snippet = re.search(r"```python\n(import geopandas.*?)```", README, re.S).group(1)
    matplotlib.use("Agg")
    ns: dict = {}
    exec(compile(snippet, "README.md", "exec"), ns)  # noqa: S102 - the README's own example
    tiles, heat = ns["tiles"], ns["heat"]
    assert len(tiles) > 0 and tiles.crs is not None and tiles.crs.to_epsg() == 26914
    assert heat.count() > 0 and float(heat.max()) <= 1.0
    assert Path(tmp_path, "out", "m_4709963_se_14_1_20190904", "quicklook.png").exists()
    assert os.path.exists(REPO / "docs" / "quickstart-naip.jpg")

