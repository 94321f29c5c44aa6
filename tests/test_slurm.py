"""jobs/slurm/ on a real single-node Slurm: an array job of 3 tasks over real scenes, and
3 tasks sharing one scene by tile rows, each collected by a dependent collect job, must
give the same tiles as one plain process; so must the GPU job (tilescan-gpu.sbatch) as an
array of 2 tasks of 2 GPUs each, on the node's stand-in GPUs, which Slurm allocates and
hands out as it does real ones (CUDA_VISIBLE_DEVICES), with the model on JAX's CPU build.
Also the shard logic itself (tilescan.pipeline.units.parse_shard / plan_units), which needs
no cluster.

The fixture starts the cluster with jobs/slurm/local-cluster.sh (it apt-get installs
slurmctld/slurmd/munge when missing, so it needs root). Without root, apt or a working
Slurm the tests skip -- except with TILESCAN_REQUIRE_SLURM=1 (as in .ci/run), where that
is a failure.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

import batch_helpers as bh
from conftest import need_jax, unavailable

CLUSTER = bh.JOBS / "slurm" / "local-cluster.sh"
ARRAY = bh.JOBS / "slurm" / "tilescan-array.sbatch"
GPU_JOB = bh.JOBS / "slurm" / "tilescan-gpu.sbatch"
COLLECT = bh.JOBS / "slurm" / "collect.sbatch"
GPUS = 2  # stand-in GPUs of the local node (local-cluster.sh: TILESCAN_SLURM_GPUS)


def _unavailable(msg: str):
    unavailable(msg, "TILESCAN_REQUIRE_SLURM")


@pytest.fixture(scope="module")
def slurm():
    """A running single-node Slurm; yields the environment its clients need."""
    if os.name != "posix" or not Path("/proc").exists():
        _unavailable("a local Slurm needs Linux")
    if os.geteuid() != 0:
        _unavailable("starting a local Slurm needs root (apt-get install, daemons as root)")
    # short and local: munge's Unix socket lives in it (108-byte path limit)
    state = Path(tempfile.mkdtemp(prefix="tilescan-slurm-", dir="/tmp"))
    t0 = time.monotonic()
    try:
        try:
            p = subprocess.run([str(CLUSTER), "start", str(state)], capture_output=True, text=True, timeout=900,
                               env={**os.environ, "TILESCAN_SLURM_GPUS": str(GPUS)})
        except subprocess.TimeoutExpired:
            _unavailable("jobs/slurm/local-cluster.sh start took more than 15 minutes")
        if p.returncode != 0:
            _unavailable(f"jobs/slurm/local-cluster.sh start failed (exit {p.returncode}): {p.stderr[-1500:]}")
        print(f"slurm started in {time.monotonic() - t0:.1f} s")
        yield bh.env(SLURM_CONF=str(state / "slurm.conf"))
    finally:
        subprocess.run([str(CLUSTER), "stop", str(state)], capture_output=True, text=True, timeout=120)
        shutil.rmtree(state, ignore_errors=True)


def _sbatch(env, cwd: Path, *args: str) -> str:
    p = subprocess.run(["sbatch", "--parsable", *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd, timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout.strip().split(";")[0]


def _wait(env, job_ids: list[str], timeout: float = 480) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        p = subprocess.run(["squeue", "-h", "-j", ",".join(job_ids)], capture_output=True, text=True, env=env)
        if p.returncode == 0 and not p.stdout.strip():
            return
        time.sleep(0.5)
    pytest.fail(f"Slurm jobs {job_ids} still queued or running after {timeout} s")


def _states(env, job_id: str) -> dict[str, tuple[str, str]]:
    """Array task id (or '-') -> (JobState, ExitCode) from scontrol (no slurmdbd here)."""
    p = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr
    out = {}
    for line in p.stdout.splitlines():
        task = re.search(r"\bArrayTaskId=(\S+)", line)
        state = re.search(r"\bJobState=(\S+)", line).group(1)
        code = re.search(r"\bExitCode=(\S+)", line).group(1)
        out[task.group(1) if task else "-"] = (state, code)
    return out


@pytest.fixture(scope="module")
def runs(slurm, tmp_path_factory):
    """Submit both cases at once (the cluster runs them while the reference is made)."""
    work = tmp_path_factory.mktemp("slurm-work")
    t0 = time.monotonic()
    multi = work / "multi"
    split = work / "split"
    jobs = {}
    jobs["multi"] = _sbatch(slurm, work, "--array=0-2", ARRAY, "-o", multi, *bh.scene_paths(), *bh.ARGS)
    jobs["multi-collect"] = _sbatch(slurm, work, f"--dependency=afterany:{jobs['multi']}", COLLECT, multi)
    jobs["split"] = _sbatch(slurm, work, "--array=0-2", ARRAY, "-o", split, bh.scene("rasterio/cogeo.tif"), *bh.ARGS)
    jobs["split-collect"] = _sbatch(slurm, work, f"--dependency=afterany:{jobs['split']}", COLLECT, split)
    gpu = work / "gpu"
    if importlib.util.find_spec("jax") is not None:  # the GPU job's backend (its test skips without it)
        # without the tests' KERAS_BACKEND: the job's own default (JAX) is what a user gets
        plain = {k: v for k, v in slurm.items() if k != "KERAS_BACKEND"}
        jobs["gpu"] = _sbatch(plain, work, "--array=0-1", f"--gres=gpu:{GPUS}", "--cpus-per-task=2", GPU_JOB,
                              "-o", gpu, *bh.scene_paths(), *bh.ARGS)
        jobs["gpu-collect"] = _sbatch(slurm, work, f"--dependency=afterany:{jobs['gpu']}", COLLECT, gpu)
    ref = bh.reference(tmp_path_factory)
    _wait(slurm, list(jobs.values()))
    print(f"slurm: the arrays and collect jobs finished {time.monotonic() - t0:.1f} s after submission")
    return {"work": work, "multi": multi, "split": split, "gpu": gpu, "jobs": jobs, "ref": ref, "env": slurm}


def _check_jobs(runs, name: str) -> None:
    env, work, jobs = runs["env"], runs["work"], runs["jobs"]
    states = _states(env, jobs[name])
    assert sorted(states) == ["0", "1", "2"], states
    for task, (state, code) in states.items():
        log = work / f"tilescan-{jobs[name]}_{task}.out"
        assert (state, code) == ("COMPLETED", "0:0"), f"task {task}: {state} {code}\n{log.read_text() if log.exists() else ''}"
        text = log.read_text()  # one log per task, named by the array job and task id
        assert f"task {task} (3 tasks)" in text and "finished with exit code 0" in text, text
    cstate = _states(env, jobs[f"{name}-collect"])
    assert list(cstate.values()) == [("COMPLETED", "0:0")], cstate
    assert "tiles from" in (work / f"tilescan-collect-{jobs[name + '-collect']}.out").read_text()


def _shard_reports(out: Path, n: int = 3) -> list[dict]:
    reports = [json.loads((out / f"report-shard-{i:04d}-of-{n:04d}.json").read_text()) for i in range(n)]
    for i, r in enumerate(reports):
        assert r["shard"] == [i, n] and r["counts"]["failed"] == 0
    return reports


@pytest.mark.slurm
@pytest.mark.slow
def test_array_over_scenes_equals_one_process(runs):
    _check_jobs(runs, "multi")
    reports = _shard_reports(runs["multi"])
    done = [u["unit"] for r in reports for u in r["done"]]
    assert sorted(done) == sorted(bh.UNITS)  # every scene once, by exactly one task
    assert all(r["done"] for r in reports)  # and every task had work
    got, want = bh.collected(runs["multi"]), bh.collected(runs["ref"])
    bh.assert_same_tiles(got, want, exact=True)  # whole scenes: same batches, same numbers

    import geopandas as gpd

    gdf = gpd.read_parquet(runs["multi"] / "collected" / "tiles.parquet")
    assert len(gdf) == len(want) and gdf.crs.equals("OGC:CRS84")
    assert set(gdf["scene"]) == set(bh.UNITS)


@pytest.mark.slurm
@pytest.mark.slow
def test_array_splits_one_scene_by_tile_rows(runs):
    _check_jobs(runs, "split")
    reports = _shard_reports(runs["split"])
    parts = [u["unit"] for r in reports for u in r["done"]]
    assert len(parts) == 3 and all(len(r["done"]) == 1 for r in reports)  # one band per task
    assert all(p.startswith("cogeo/rows-") for p in parts)
    bands = sorted(tuple(json.loads((runs["split"] / p / "run.json").read_text())["rows"]) for p in parts)
    assert bands[0][0] == 0 and bands[-1][1] == 8 and all(a[1] == b[0] for a, b in zip(bands, bands[1:])), bands
    for p in parts:  # each band is a full set of outputs of its own
        assert {"tiles.parquet", "labels.tif", "heatmap.tif", "run.json"} <= {f.name for f in (runs["split"] / p).iterdir()}
    got = bh.collected(runs["split"])
    want = bh.collected(runs["ref"])
    want = want[want["scene"] == "cogeo"].reset_index(drop=True)
    assert sorted(set(got["unit"])) == sorted(parts)
    # other batch composition than the single process: labels equal, numbers within float noise
    bh.assert_same_tiles(got, want, exact=False)
    summary = json.loads((runs["split"] / "collected" / "summary.json").read_text())
    assert summary["scenes"]["cogeo"]["complete"] is True and summary["scenes"]["cogeo"]["tiles"] == 64


@pytest.mark.slurm
@pytest.mark.slow
def test_gpu_array_runs_one_process_per_allocated_gpu(runs):
    """sbatch --array=0-1 --gres=gpu:2 --cpus-per-task=2 tilescan-gpu.sbatch: Slurm allocates
    the node's two GPUs to one task at a time; each task runs a process per GPU, each on its
    own GPU and shard (task k: shards 2k and 2k+1 of 4) with its share of the task's CPUs,
    and together they equal one plain process."""
    need_jax()
    env, work, jobs = runs["env"], runs["work"], runs["jobs"]
    states = _states(env, jobs["gpu"])
    assert sorted(states) == ["0", "1"], states
    for task, (state, code) in states.items():
        log = work / f"tilescan-gpu-{jobs['gpu']}_{task}.out"
        text = log.read_text() if log.exists() else ""
        assert (state, code) == ("COMPLETED", "0:0"), f"task {task}: {state} {code}\n{text}"
        # the GPUs are Slurm's allocation (CUDA_VISIBLE_DEVICES), not a setting of the test
        assert f"(array task {task} of 2) on " in text and "2 GPU(s) [0 1], shards" in text, text
        assert "KERAS_BACKEND=jax cpus=2" in text, text
        for r in range(GPUS):
            assert f"[shard {GPUS * int(task) + r}/4 gpu {r}] done:" in text, text
        assert "exit codes of the processes: 0 0" in text and "finished with exit code 0" in text, text
    assert list(_states(env, jobs["gpu-collect"]).values()) == [("COMPLETED", "0:0")]
    reports = _shard_reports(runs["gpu"], 4)
    done = [u["unit"] for r in reports for u in r["done"]]
    assert sorted(done) == sorted(bh.UNITS)  # every scene once, by exactly one process
    runtimes = [json.loads((runs["gpu"] / u / "run.json").read_text())["runtime"] for u in done]
    # the GPU job's backend, and one CPU thread each: the task's 2 CPUs shared by its 2 processes
    assert {(rt["backend"], rt["cpu"]["tf_intra_op_threads"]) for rt in runtimes} == {("jax", 1)}, runtimes
    # JAX against the TensorFlow reference: the same tiles and labels, numbers within float noise
    bh.assert_same_tiles(bh.collected(runs["gpu"]), bh.collected(runs["ref"]), exact=False)


def _wait_for(what, check, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not seen in {timeout} s")
        time.sleep(0.5)


@pytest.mark.slurm
@pytest.mark.slow
def test_a_stopped_task_requeues_itself_alone_and_a_cancelled_one_not(slurm, tmp_path):
    """The time-limit warning (SIGTERM to the batch shell, as --signal=B:TERM@120 sends it) to an
    array's last task, whose job id is the array's own, requeues that task alone: the other task
    runs on to the end. A task the user cancels (scancel: SIGTERM to all its processes, tilescan
    gets it twice) stops cleanly with exit 75 and is not requeued."""
    naip = [bh.scene(f"opengeos-naip/m_4709963_se_14_1_{d}.tif") for d in ("20100629", "20150926")]
    out = tmp_path / "out"
    slow = ("--tile-size", "16", "--units", "px", "--batch-size", "8")  # a scene takes a minute: still running when signalled
    job = _sbatch(slurm, tmp_path, "--array=0-1", ARRAY, "-o", out, *naip, *slow)
    logs = [tmp_path / f"tilescan-{job}_{t}.out" for t in (0, 1)]
    staging = out / ".tilescan-staging"
    _wait_for("both tasks' scenes in staging", lambda: staging.is_dir() and len(list(staging.iterdir())) >= 2)
    subprocess.run(["scancel", "--signal=TERM", "--batch", f"{job}_1"], env=slurm, check=True)
    _wait_for("task 1's requeue", lambda: "requeueing" in logs[1].read_text())
    _wait_for("task 0 at its end", lambda: _states(slurm, f"{job}_0")["0"][0] == "COMPLETED")
    assert f"stopped by a signal; requeueing {job}_1 (finished scenes are kept)" in logs[1].read_text()
    text = logs[0].read_text()
    assert "finished with exit code 0" in text and "requeueing" not in text and "DUE TO JOB REQUEUE" not in text, text
    subprocess.run(["scancel", job], env=slurm, check=True)  # the requeued task waits for its begin time

    job = _sbatch(slurm, tmp_path, "--array=0-0", ARRAY, "-o", tmp_path / "cancelled", naip[0], *slow)
    log = tmp_path / f"tilescan-{job}_0.out"
    _wait_for("the task's scene in staging", lambda: (tmp_path / "cancelled" / ".tilescan-staging").is_dir()
              and any((tmp_path / "cancelled" / ".tilescan-staging").iterdir()))
    subprocess.run(["scancel", f"{job}_0"], env=slurm, check=True)
    _wait(slurm, [job])
    text = log.read_text()
    assert f"not requeued: {job}_0 is " in text and "finished with exit code 75" in text, text
    report = json.loads((tmp_path / "cancelled" / "report.json").read_text())
    assert report["interrupted"]["signal"] == "SIGTERM" and not any((tmp_path / "cancelled").glob("m_*"))


def test_a_stopped_task_is_not_requeued_blind_when_slurm_does_not_answer(tmp_path):
    """A stop while the controller does not answer (``scontrol show job`` fails; here a
    stand-in for a controller timeout): the task is not requeued, and the log says why and
    what to do, rather than naming an empty job state."""
    quiet = tmp_path / "bin"
    quiet.mkdir()
    (quiet / "scontrol").write_text("#!/bin/sh\necho 'slurm_load_jobs error: Socket timed out' >&2\nexit 1\n")
    (quiet / "scontrol").chmod(0o755)
    env = bh.env(SLURM_JOB_ID="1000", SLURM_ARRAY_JOB_ID="1000", SLURM_ARRAY_TASK_ID="0", SLURM_ARRAY_TASK_COUNT="1",
                 SLURM_ARRAY_TASK_MIN="0", SLURM_ARRAY_TASK_MAX="0", SLURM_ARRAY_TASK_STEP="1",
                 TILESCAN_TEST_SIGNAL_AT="reading:1", TILESCAN=bh.exe())
    env["PATH"] = f"{quiet}{os.pathsep}{env['PATH']}"
    p = subprocess.run(["bash", str(ARRAY), "-o", tmp_path / "out", bh.scene("rasterio/RGB.byte.tif"), *bh.ARGS],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 75, p.stderr
    assert ("not requeued: Slurm could not be asked for 1000_0's state (scontrol show job failed); resubmit to "
            "resume") in p.stderr, p.stderr


# ----------------------------------------------------------------------------- shard logic (no cluster)

# What Slurm 22.05 sets in the tasks of --array=0-6:3 and --array=1,3,5 (seen on the local cluster)
STEPPED = [{"SLURM_ARRAY_TASK_ID": str(t), "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "0",
            "SLURM_ARRAY_TASK_MAX": "6", "SLURM_ARRAY_TASK_STEP": "3"} for t in (0, 3, 6)]
LISTED = [{"SLURM_ARRAY_TASK_ID": str(t), "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "1",
           "SLURM_ARRAY_TASK_MAX": "5", "SLURM_ARRAY_TASK_STEP": "1"} for t in (1, 3, 5)]


def test_a_shard_taken_from_the_scheduler_is_said_with_the_way_out(tmp_path):
    """An array task's shard comes from Slurm's variables: the run says so, and how a task given
    scenes of its own does them all (each took a third of its own folder, silently); not said
    with --shard given."""
    from conftest import invoke

    args = ["run", tmp_path / "missing.tif", "-o", tmp_path / "out", "--no-progress"]
    res = invoke(args, env=STEPPED[1])
    assert "shard 1/3 from SLURM_ARRAY_TASK_ID: this task does its share of the scenes given, as the array's other " \
        "tasks do theirs; where each task is given scenes of its own, pass --shard 0/1" in res.output, res.output
    assert "from SLURM_ARRAY_TASK_ID" not in invoke([*args, "--shard", "0/1"], env=STEPPED[1]).output


def test_parse_shard_sources_and_errors():
    from tilescan.errors import ConfigError
    from tilescan.pipeline.units import parse_shard

    assert parse_shard(None, {}) == (0, 1)
    assert parse_shard("2/5", {"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "3"}) == (2, 5)  # the flag wins
    assert [parse_shard(None, e) for e in STEPPED] == [(0, 3), (1, 3), (2, 3)]
    # --array=5-7 without COUNT (older Slurm): numbered from MIN
    assert parse_shard(None, {"SLURM_ARRAY_TASK_ID": "6", "SLURM_ARRAY_TASK_MIN": "5", "SLURM_ARRAY_TASK_MAX": "7"}) == (1, 3)
    assert parse_shard(None, {"JOB_COMPLETION_INDEX": "2", "TILESCAN_SHARD_COUNT": "3"}) == (2, 3)
    assert parse_shard(None, {"JOB_COMPLETION_INDEX": "1"}, count=4) == (1, 4)
    for bad, match in [
        (("0/0", {}), "0 <= I < N"), (("3/3", {}), "0 <= I < N"), (("a/b", {}), "I/N"),
        ((None, LISTED[1]), "contiguous"),  # ids 1,3,5 cannot be numbered 0..2 safely
        ((None, {"SLURM_ARRAY_TASK_ID": "x", "SLURM_ARRAY_TASK_COUNT": "3"}), "not an integer"),
        ((None, {"JOB_COMPLETION_INDEX": "0"}), "shard count is unknown"),
        ((None, {"JOB_COMPLETION_INDEX": "3", "TILESCAN_SHARD_COUNT": "3"}), "outside"),
    ]:
        with pytest.raises(ConfigError, match=match):
            parse_shard(*bad)
    with pytest.raises(ConfigError, match="--shard-count 3 needs JOB_COMPLETION_INDEX"):
        parse_shard(None, {}, count=3)  # not every unit, on each of 3 pods that lack their index
    for env in LISTED:  # every task of such an array fails, not just some
        with pytest.raises(ConfigError):
            parse_shard(None, env)


def test_each_row_band_labels_raster_lies_over_its_own_rows(tmp_path, scene_path):
    """One scene on 2 shards (--shard, no cluster): each rows-A-B/labels.tif is a band of the
    scene's label grid, georeferenced over rows A..B: its grid is the scene's from row A on,
    and sampled at each of its tiles' footprints it gives that tile's class, as the band's
    tiles.parquet says."""
    import geopandas as gpd
    import numpy as np
    import rasterio
    from affine import Affine

    from conftest import LABEL_NODATA, invoke, tiny_model_file

    scene = scene_path("rasterio/RGB.byte.tif")  # 791 x 718 px: 6 x 7 tiles of 128 px
    model = tiny_model_file(tmp_path / "m.keras", ["built-up", "water"], 32, seed=5)
    out = tmp_path / "out"
    for i in range(2):
        res = invoke(["run", scene, "-o", out, "--model", model, "--tile-size", "128", "--units", "px",
                      "--no-progress", "--shard", f"{i}/2"])
        assert res.exit_code == 0, res.output
    with rasterio.open(scene) as ds:
        T = ds.transform
    parts = sorted((out / "RGB.byte").glob("rows-*"))
    assert [p.name for p in parts] == ["rows-00000-00003", "rows-00003-00006"]
    for part in parts:
        r0, r1 = json.loads((part / "run.json").read_text())["rows"]
        tiles = gpd.read_parquet(part / "tiles.parquet")
        assert len(tiles) and set(tiles.row) <= set(range(r0, r1))
        with rasterio.open(part / "labels.tif") as L:
            assert L.shape == (r1 - r0, 7)
            assert L.transform.almost_equals(T @ Affine.translation(0, r0 * 128) @ Affine.scale(128))
            labels = L.read(1)
            cells = [L.index(*g.centroid.coords[0]) for g in tiles.geometry]
        expect = np.full((r1 - r0, 7), LABEL_NODATA, np.uint8)
        expect[tiles.row.to_numpy() - r0, tiles.col.to_numpy()] = tiles.class_index.to_numpy()
        np.testing.assert_array_equal(labels, expect)
        assert cells == list(zip(tiles.row - r0, tiles.col)), part.name  # each tile's footprint on its own cell


@pytest.mark.parametrize("n_scenes,rows,n", [(1, 8, 3), (1, 9, 4), (1, 5, 3), (2, 20, 3), (4, 8, 3), (5, 50, 2), (3, 7, 1),
                                                  (1, 6, 3), (2, 6, 3)])  # the last two: exactly 2 N rows, split
def test_plan_units_cover_every_tile_row_once(n_scenes, rows, n):
    from tilescan.pipeline.units import plan_units

    scenes = [Path(f"/data/s{k}.tif") for k in range(n_scenes)]
    shares = [plan_units(scenes, None, (i, n), lambda s: rows) for i in range(n)]
    assert shares == [plan_units(scenes, None, (i, n), lambda s: rows) for i in range(n)]  # deterministic
    units = [u for share in shares for u in share]
    assert len({u.key for u in units}) == len(units)  # distinct output folders
    for s in scenes:
        got = sorted((u.row_start or 0, rows if u.row_stop is None else u.row_stop) for u in units if u.scene == s)
        assert got[0][0] == 0 and got[-1][1] == rows and all(a[1] == b[0] for a, b in zip(got, got[1:]))
        if n_scenes < n and rows >= 2 * n:  # split: N bands, one per shard, at least 2 rows each
            assert len(got) == n and min(b - a for a, b in got) >= 2
        else:
            assert got == [(0, rows)]
    assert max(map(len, shares)) - min(map(len, shares)) <= 1  # dealt evenly
