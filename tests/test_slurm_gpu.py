"""jobs/slurm/tilescan-gpu.sbatch without a GPU or a cluster: the shard each process gets
(array task x GPU), its refusals, and -- run here as Slurm would run the batch script, with
KERAS_BACKEND=tensorflow on the CPU standing in for the GPUs -- real runs that must collect
to the same tiles as one plain process, and a SIGTERM that must reach every process."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time

import pytest

import batch_helpers as bh
from tilescan.pipeline.units import parse_shard

SCRIPT = bh.JOBS / "slurm" / "tilescan-gpu.sbatch"
LINE = re.compile(r"^tilescan-gpu: gpu (\S+) shard (\d+)/(\d+): CUDA_VISIBLE_DEVICES=(\S+) \S+ run --no-progress --shard \2/\3 ")


def _array_env(ids: list[int] | None, task: int | None, step: int = 1) -> dict[str, str]:
    """The variables Slurm sets in array task ``task`` of ``--array=ids[0]-ids[-1]:step``."""
    if ids is None:
        return {}
    return {"SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_TASK_MIN": str(ids[0]), "SLURM_ARRAY_TASK_MAX": str(ids[-1]),
            "SLURM_ARRAY_TASK_STEP": str(step), "SLURM_ARRAY_TASK_COUNT": str(len(ids))}


def _script(*args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=bh.env(TILESCAN=bh.exe(), **env))


@pytest.mark.parametrize("gpus", ["0", "0,1", "3,1,2,0"])
@pytest.mark.parametrize("ids, step", [(None, 1), ([0], 1), ([0, 1, 2], 1), ([4, 7, 10, 13], 3)])
def test_every_shard_runs_once_on_its_own_gpu(gpus, ids, step):
    per_task = gpus.split(",")
    seen: list[int] = []
    for task in ids or [None]:
        env = _array_env(ids, task, step)
        p = _script("-o", "OUT", "scenes/", TILESCAN_DRY_RUN="1", CUDA_VISIBLE_DEVICES=gpus, **env)
        assert p.returncode == 0, p.stderr
        procs = [m.groups() for m in map(LINE.match, p.stdout.splitlines()) if m]
        assert len(procs) == len(per_task), p.stdout
        # one process per GPU, each seeing that GPU alone
        assert [g for g, _, _, _ in procs] == [v for _, _, _, v in procs] == per_task
        total = len(ids or [0]) * len(per_task)
        assert {int(n) for _, _, n, _ in procs} == {total}
        # the task's shards follow the array index tilescan itself reads from Slurm's variables
        k = parse_shard(None, env)[0]
        assert [int(i) for _, i, _, _ in procs] == [k * len(per_task) + r for r in range(len(per_task))]
        seen += [int(i) for _, i, _, _ in procs]
    assert sorted(seen) == list(range(total))  # every shard once, none twice


@pytest.mark.parametrize("args, env, message", [
    (["-o", "OUT", "s.tif"], {}, "no GPU allocated"),
    (["-o", "OUT", "s.tif"], {"CUDA_VISIBLE_DEVICES": "-1"}, "no GPU allocated"),
    (["-o", "OUT", "s.tif"], {"CUDA_VISIBLE_DEVICES": "NoDevFiles"}, "no GPU allocated"),  # Slurm: gres, no device files
    (["-o", "OUT", "s.tif", "--shard", "0/2"], {"CUDA_VISIBLE_DEVICES": "0"}, "do not pass --shard"),
    (["-o", "OUT", "s.tif", "--shard-count=2"], {"CUDA_VISIBLE_DEVICES": "0"}, "do not pass --shard-count"),
    # --array=1,3,5: three tasks whose ids are not numberable as min + k*step
    (["-o", "OUT", "s.tif"], {"CUDA_VISIBLE_DEVICES": "0", "SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_MIN": "1",
                              "SLURM_ARRAY_TASK_MAX": "5", "SLURM_ARRAY_TASK_COUNT": "3"}, "contiguous array"),
    ([], {"CUDA_VISIBLE_DEVICES": "0"}, "usage:"),
])
def test_refuses_what_it_cannot_shard(args, env, message):
    p = _script(*args, TILESCAN_DRY_RUN="1", **env)
    assert p.returncode == 2 and message in p.stderr, (p.stdout, p.stderr)


def test_gpu_count_from_slurm_when_cuda_visible_devices_is_unset():
    p = _script("-o", "OUT", "s.tif", TILESCAN_DRY_RUN="1", SLURM_GPUS_ON_NODE="2")
    assert p.returncode == 0, p.stderr
    assert [m.group(2, 3) for m in map(LINE.match, p.stdout.splitlines()) if m] == [("0", "2"), ("1", "2")]


def test_each_process_reads_with_its_share_of_the_task_cpus():
    """--cpus-per-task=8 with 2 GPUs: each process reads with 4 threads (reader_threads =
    "auto" would start 8 in each); a reader setting in the environment is kept."""
    p = _script("-o", "OUT", "s.tif", TILESCAN_DRY_RUN="1", CUDA_VISIBLE_DEVICES="0,1", SLURM_CPUS_PER_TASK="8")
    assert p.returncode == 0, p.stderr
    assert p.stdout.count(" TILESCAN_INFERENCE__READER_THREADS=4 ") == 2, p.stdout
    p = _script("-o", "OUT", "s.tif", TILESCAN_DRY_RUN="1", CUDA_VISIBLE_DEVICES="0,1", SLURM_CPUS_PER_TASK="8",
                TILESCAN_INFERENCE__READER_THREADS="2")
    assert p.stdout.count(" TILESCAN_INFERENCE__READER_THREADS=2 ") == 2, p.stdout


@pytest.mark.slow
def test_two_tasks_of_two_gpus_equal_one_process(tmp_path, tmp_path_factory):
    out = tmp_path / "out"
    ids = [0, 1]
    for task in ids:  # one after the other: two processes at a time on this machine's CPUs
        p = _script("-o", out, *bh.scene_paths(), *bh.ARGS, timeout=600, CUDA_VISIBLE_DEVICES="0,1",
                    KERAS_BACKEND="tensorflow", **_array_env(ids, task))
        assert p.returncode == 0, p.stdout + p.stderr
        assert "finished with exit code 0" in p.stdout
        for r in range(2):  # each process's lines carry its shard and GPU
            assert f"[shard {2 * task + r}/4 gpu {r}] done:" in p.stderr, p.stderr
    reports = [json.loads((out / f"report-shard-{i:04d}-of-0004.json").read_text()) for i in range(4)]
    assert sorted(u["unit"] for r in reports for u in r["done"]) == sorted(bh.UNITS)  # one scene per shard
    c = bh.tilescan("collect", out)
    assert c.returncode == 0, c.stderr
    bh.assert_same_tiles(bh.collected(out), bh.collected(bh.reference(tmp_path_factory)), exact=True)


@pytest.mark.slow
def test_sigterm_reaches_every_process(tmp_path):
    """Slurm's --signal=B:TERM reaches the batch shell only: it must pass SIGTERM to each
    process, each stops between batches, and the task exits 75 (requeue)."""
    out = tmp_path / "out"
    proc = subprocess.Popen(["bash", str(SCRIPT), "-o", str(out), str(bh.scene("rasterio/cogeo.tif")),
                             "--units", "px", "--tile-size", "16", "--batch-size", "8"],  # 2048 tiles a band: minutes
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=bh.env(TILESCAN=bh.exe(), CUDA_VISIBLE_DEVICES="0,1", KERAS_BACKEND="tensorflow"))
    staging = out / ".tilescan-staging"
    deadline = time.monotonic() + 180
    while len(list(staging.glob(".rows-*"))) < 2:  # both processes are inside their band of the scene
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the processes never were both inside their bands:\n" + "".join(proc.communicate()))
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)  # the shell, not tilescan
    stdout, _ = proc.communicate(timeout=60)
    assert proc.returncode == 75 and "exit codes of the processes: 75 75" in stdout, stdout
    # each process's last lines came before the script's own last: Slurm ends what outlives it
    lines = stdout.splitlines()
    assert lines[-1].startswith("tilescan-gpu: task none finished with exit code 75"), stdout
    assert all(any(ln.startswith(f"[shard {i}/2 gpu {i}] done:") for ln in lines) for i in range(2)), stdout
    for i in range(2):
        report = json.loads((out / f"report-shard-{i:04d}-of-0002.json").read_text())
        assert report["interrupted"]["signal"] == "SIGTERM" and report["done"] == [], report
    assert not list(out.glob("cogeo/rows-*"))  # nothing partial in place


@pytest.mark.slow
def test_one_process_losing_its_scene_makes_the_task_exit_3(tmp_path):
    """One shard gets a truncated GeoTIFF (exit 4: all its scenes failed), the other a good
    scene (exit 0): for the task that is 'some scenes failed'. Which shard gets which follows
    the sorted resolved paths (the good scene is a link into ../shared), so either order."""
    scenes = tmp_path / "scenes"
    scenes.mkdir()
    (scenes / "broken.tif").write_bytes(bh.scene("rasterio/RGB.byte.tif").read_bytes()[:2000])
    (scenes / "cog_rgb.tif").symlink_to(bh.scene("rio-tiler/cog_rgb.tif"))
    p = _script("-o", tmp_path / "out", scenes, "--units", "px", "--tile-size", "400", timeout=600,
                CUDA_VISIBLE_DEVICES="0,1", KERAS_BACKEND="tensorflow")
    codes = re.search(r"exit codes of the processes: (\d+) (\d+)", p.stdout)
    assert codes and sorted(codes.groups()) == ["0", "4"], p.stdout + p.stderr
    bad = codes.groups().index("4")  # the shard that got broken.tif, on its own GPU
    assert p.returncode == 3 and f"[shard {bad}/2 gpu {bad}] error:" in p.stderr and "broken.tif" in p.stderr
    assert (tmp_path / "out" / "cog_rgb" / "run.json").exists()
