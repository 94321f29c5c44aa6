"""JAX, the backend ``tilescan[gpu]`` installs, run on this machine's CPU (``tilescan[test]``
installs the CPU build): the shipped model gives TensorFlow's labels on real scenes, and a
second process finds every compiled step in JAX's persistent compilation cache. CUDA itself
needs a GPU (``tests/test_backend.py``, mark ``gpu``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
from batch_helpers import assert_unit_equal, env, tilescan
from conftest import need_jax, scene

NAIP = [f"opengeos-naip/m_4709963_se_14_1_{d}.tif" for d in ("20100629", "20150926", "20190904")]  # 5 m, the model's scale


# The start of a child script: JAX's events (its public monitoring hook) counted by their last
# name, e.g. "cache_hits" and "cache_misses" of the persistent compilation cache.
_COUNT_EVENTS = """
import collections
import jax.monitoring
counts = collections.Counter()
jax.monitoring.register_event_listener(lambda event, **kw: counts.update([event.rsplit("/", 1)[-1]]))
"""

# The CLI in a fresh process, its JAX events written, as JSON, to the file named by the first argument.
_COUNTING_CLI = _COUNT_EVENTS + """
import atexit, json, sys
report, sys.argv = sys.argv[1], ["tilescan", *sys.argv[2:]]
atexit.register(lambda: open(report, "w").write(json.dumps(counts)))
from tilescan.cli import entry
entry()
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The NAIP scenes through the CLI: once with TensorFlow, twice with JAX sharing one
    compilation cache (each run a fresh process; JAX's cache hits and misses counted)."""
    need_jax()
    paths = [scene(s) for s in NAIP]
    base = tmp_path_factory.mktemp("jax")
    cache = base / "cache"
    args = ("run", "--no-progress", *paths)
    p = tilescan(*args, "-o", base / "tf", KERAS_BACKEND="tensorflow", TILESCAN_COMPILE_CACHE=str(cache))
    assert p.returncode == 0, p.stderr[-3000:]
    listed = {"tf": _listed(cache)}
    events = {}
    for name in ("jax1", "jax2"):
        report = base / f"{name}-events.json"
        p = subprocess.run([sys.executable, "-c", _COUNTING_CLI, str(report), *map(str, args), "-o", str(base / name)],
                           capture_output=True, text=True, timeout=600,
                           env=env(KERAS_BACKEND="jax", TILESCAN_COMPILE_CACHE=str(cache)))
        assert p.returncode == 0, p.stderr[-3000:]
        events[name] = json.loads(report.read_text())
        listed[name] = _listed(cache)
    return {n: base / n for n in ("tf", "jax1", "jax2")}, cache, listed, events


def _listed(cache: Path) -> list[str]:
    return sorted(f.name for f in cache.iterdir()) if cache.exists() else []


def _units(out: Path) -> list[Path]:
    return sorted(p for p in out.iterdir() if p.is_dir() and not p.name.startswith("."))


def test_runs_say_which_backend_computed(runs):
    out, cache = runs[:2]
    for name, backend in (("tf", "tensorflow"), ("jax1", "jax")):
        for unit in _units(out[name]):
            rt = json.loads((unit / "run.json").read_text())["runtime"]
            assert rt["backend"] == backend and rt["device"] == "cpu" and rt["precision"] == "float32", rt
            # JAX compiles the model step, and its cache is where the environment says
            assert rt["compile_cache"] == (str(cache) if backend == "jax" else None), rt


def test_jax_gives_tensorflows_labels_probabilities_and_heatmaps(runs):
    out = runs[0]
    tf_units, jax_units = _units(out["tf"]), _units(out["jax1"])
    assert [u.name for u in tf_units] == [u.name for u in jax_units] and len(tf_units) == len(NAIP)
    for a, b in zip(tf_units, jax_units):
        ta, tb = pq.read_table(a / "tiles.parquet"), pq.read_table(b / "tiles.parquet")
        assert ta.num_rows == tb.num_rows > 0
        for col in ("row", "col", "geometry", "label", "class_index", "valid_fraction"):
            assert ta[col].to_pylist() == tb[col].to_pylist(), f"{a.name}: {col} differs"
        for col in ("probabilities", "confidence", "cam_mean", "cam_max", "cam_raw_max"):
            x, y = np.array(ta[col].to_pylist(), np.float64), np.array(tb[col].to_pylist(), np.float64)
            np.testing.assert_allclose(y, x, rtol=0, atol=1e-5, err_msg=f"{a.name}: {col}")
        with rasterio.open(a / "labels.tif") as x, rasterio.open(b / "labels.tif") as y:
            np.testing.assert_array_equal(y.read(), x.read(), err_msg=f"{a.name}: label pixels")
        with rasterio.open(a / "heatmap.tif") as x, rasterio.open(b / "heatmap.tif") as y:
            hx, hy = x.read(1), y.read(1)
            assert x.profile == y.profile
            np.testing.assert_array_equal(hy == y.nodata, hx == x.nodata, err_msg=f"{a.name}: heat nodata")
            np.testing.assert_allclose(hy, hx, rtol=0, atol=1e-5, err_msg=f"{a.name}: heat")


def test_a_second_process_finds_every_compiled_step_in_the_cache(runs):
    out, _, listed, events = runs
    assert listed["tf"] == []  # TensorFlow has no such cache: nothing is written there
    first, second = events["jax1"], events["jax2"]
    assert first.get("cache_misses", 0) > 0 and listed["jax1"], (first, listed["jax1"])  # compiled and kept
    assert second.get("cache_misses", 0) == 0 and second.get("cache_hits", 0) >= first["cache_misses"], second
    assert listed["jax2"] == listed["jax1"]  # and nothing new was written
    for a, b in zip(_units(out["jax1"]), _units(out["jax2"])):
        assert_unit_equal(b, a)


_LOADS = _COUNT_EVENTS + """
import json
import numpy as np
from tilescan.backend import import_keras
keras = import_keras()
from tilescan.model import PACKAGE_MODEL, load_model
fast = load_model().model  # first: it finds nothing compiled, in memory or in the (empty) cache
fast_compiles = counts["cache_misses"]
plain = keras.saving.load_model(PACKAGE_MODEL, compile=False)  # Keras' own path
x = np.random.default_rng(0).random((4, *fast.input_shape[1:]), dtype=np.float32)
print(json.dumps({
    "fast_compiles": fast_compiles, "plain_compiles": counts["cache_misses"] - fast_compiles,
    "variables": len(plain.variables),
    "same_variables": all(a.path == b.path and a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
                          for a, b in zip(fast.variables, plain.variables)) and len(fast.variables) == len(plain.variables),
    "same_outputs": bool(np.array_equal(np.asarray(fast(x)), np.asarray(plain(x)))),
}))
"""


def test_loading_the_model_with_jax_compiles_nothing_per_weight(tmp_path):
    """The shipped model loads under JAX without a compile per weight shape (Keras' own path
    compiles its random initialisers and float16-to-float32 conversions one shape at a time)
    and with the same weights, bit for bit, as that path."""
    need_jax()
    p = subprocess.run([sys.executable, "-c", _LOADS], capture_output=True, text=True, timeout=600,
                       env=env(KERAS_BACKEND="jax", TILESCAN_COMPILE_CACHE=str(tmp_path / "cache")))
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert got["same_variables"] and got["same_outputs"], got
    assert got["plain_compiles"] >= 10, got  # what is saved: dozens of compiles
    assert got["fast_compiles"] <= 2, got  # the input Normalization layer's own build steps


_ONE_PASS = """
import json, sys
import numpy as np
import rasterio
from tilescan.model import load_model
from tilescan.explain.cam import GradCAM
card = load_model()
with rasterio.open(sys.argv[1]) as src:  # 8 tiles of a NAIP scene, scaled as the model takes them
    a = src.read([1, 2, 3], window=((0, 256), (0, 512))).astype(np.float32) / 255
x = np.stack([a[:, r:r + 128, c:c + 128].transpose(1, 2, 0) for r in (0, 128) for c in range(0, 512, 128)])
fast = GradCAM(card.model, layer=card.cam_layer, fast_head=True)
slow = GradCAM(card.model, layer=card.cam_layer, fast_head=False)
t = np.array([3, 1, 0, 29, 5, 7, 11, 2], np.int32)
out = {"path": fast.path}
for name, target in (("predicted", None), ("given", t)):
    f, s = fast.submit(x, target=target)(), slow(x, target=target)
    out[name] = {"target": f.target.tolist(), "slow_target": s.target.tolist(),
                 "dtypes": [str(f.probs.dtype), str(f.target.dtype), str(f.raw.dtype), str(f.cam.dtype)],
                 "shapes": [list(f.raw.shape), list(f.cam.shape), list(f.probs.shape)],
                 "probs": float(np.abs(f.probs - s.probs).max()), "raw": float(np.abs(f.raw - s.raw).max()),
                 "cam": float(np.abs(f.cam - s.cam).max()), "logits": float(np.abs(f.logits - s.logits).max())}
print(json.dumps(out))
"""


def test_jax_one_pass_gradcam_equals_the_backward_pass():
    """JAX's one-pass Grad-CAM (the GPU path; its results come back to the host as one array)
    gives the backward pass's classes, probabilities and maps, for predicted and given
    classes, on real tiles."""
    need_jax()
    p = subprocess.run([sys.executable, "-c", _ONE_PASS, str(scene(NAIP[2]))], capture_output=True, text=True,
                       timeout=600, env=env(KERAS_BACKEND="jax"))
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert got["path"] == "gap-dense"
    assert got["given"]["target"] == [3, 1, 0, 29, 5, 7, 11, 2]
    for case in ("predicted", "given"):
        g = got[case]
        assert g["target"] == g["slow_target"], got
        assert g["dtypes"] == ["float32", "int32", "float32", "float32"]
        assert g["shapes"] == [[8, 4, 4], [8, 4, 4], [8, 30]], got
        assert max(g["probs"], g["raw"], g["cam"], g["logits"]) < 1e-4, got
