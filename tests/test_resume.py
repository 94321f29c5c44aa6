"""Resume after SIGKILL, and atomic outputs.

``tilescan run`` is killed with SIGKILL at exact points through the test hook
``TILESCAN_TEST_KILL_AT=<phase>[:N]`` (tilescan/faults.py: the process kills itself the Nth
time it reaches the phase), again and again on the same output folder, as a crashing
node would; after each kill no output that looks finished may be incomplete, and what is
finished must equal an uninterrupted run. The last, undisturbed rerun of the same command
must leave outputs equal to the uninterrupted run's, with no tile lost or duplicated.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import pytest

import batch_helpers as bh
from conftest import quiet


def _run(out: Path, kill_at: str | None = None):
    extra = {"TILESCAN_TEST_KILL_AT": kill_at} if kill_at else {}
    return bh.tilescan("run", "--no-progress", "-o", out, *bh.scene_paths(), *bh.ARGS, **extra)


@pytest.mark.slow
def test_killed_again_and_again_then_rerun_equals_clean_run(tmp_path, tmp_path_factory):
    ref = bh.reference(tmp_path_factory)
    ref_report = json.loads((ref / "report.json").read_text())
    assert [u["unit"] for u in ref_report["done"]] == list(bh.UNITS)  # in unit order
    # batch 32: RGB.byte (23 tiles) is one batch, cogeo (64) two, image_rgb and cog_rgb one each
    assert json.loads((ref / "cogeo" / "run.json").read_text())["config"]["inference"]["batch_size"] == 32
    # Batches span scenes, and two finisher threads write units' outputs side by side, so
    # which units are done at a later kill depends on the threads' timing; what must hold
    # at every kill: the folders a user sees are whole units equal to the reference, and
    # nothing finished before is undone.
    plan = [
        ("reading:10", 0, 0),  # while reading the first scene: nothing is finished
        ("inference:1", 0, 0),  # the first batch (RGB.byte and cogeo's first tiles) computed, not yet used
        ("writing:1", 0, 0),  # the first unit's tiles.parquet is in staging: nothing moved into place yet
        # a third unit's table: a finisher took it, so one of the first two was finished
        # (two finishers), and no fourth one has started
        ("writing:3", 1, 2),
        ("before-rename:1", 0, 0),  # a unit complete in staging, killed before its rename
    ]
    out = tmp_path / "out"
    before: set[str] = set()
    for kill_at, least, most in plan:
        p = _run(out, kill_at)
        assert p.returncode == -signal.SIGKILL, f"{kill_at}: expected SIGKILL, got {p.returncode}\n{p.stderr}"
        report = json.loads((out / "report.json").read_text())  # the killed run's, still running: never a finished one's
        assert report["running"] and report["pid"] and "exit_code" not in report
        done = bh.finished_folders(out)
        assert before <= set(done) and least <= len(set(done) - before) <= most, (kill_at, sorted(done))
        for name, folder in done.items():
            bh.assert_unit_equal(folder, ref / name)
        before = set(done)
    staged = [s.parent.name for s in (out / ".tilescan-staging").glob("*/run.json")]
    assert staged and not set(staged) & before  # killed just before its rename: not in place
    assert len(before) < len(bh.UNITS)

    p = _run(out)  # the same command, undisturbed
    assert p.returncode == 0, p.stderr
    report = json.loads((out / "report.json").read_text())
    assert [u["unit"] for u in report["skipped"]] == [u for u in bh.UNITS if u in before]
    assert [u["unit"] for u in report["done"]] == [u for u in bh.UNITS if u not in before]
    done = bh.finished_folders(out)
    assert sorted(done) == sorted(bh.UNITS)
    assert not (out / ".tilescan-staging").exists()  # the killed runs' leftovers are gone, and the emptied folder
    assert not (out / ".tilescan-locks").exists()
    for name in bh.UNITS:
        bh.assert_unit_equal(out / name, ref / name)

    p = bh.tilescan("collect", out)
    assert p.returncode == 0, p.stderr
    bh.assert_same_tiles(bh.collected(out), bh.collected(ref), exact=True)


def test_finished_outputs_are_replaced_only_with_overwrite(tmp_path, scene_path):
    """Same config: skipped. Changed config: refused, files untouched. --overwrite: redone."""
    from tilescan.config import load_config
    from tilescan.pipeline.run import run

    scene = scene_path("rio-tiler/cog_rgb.tif")
    out = tmp_path / "out"
    cfg = lambda **o: load_config(None, {"tiling": {"tile_size": 128}, "output": o}, environ={})  # noqa: E731
    assert run([scene], out, cfg(), log=quiet).to_dict()["counts"]["done"] == 1
    first = json.loads((out / "cog_rgb" / "run.json").read_text())
    before = {f.name: f.stat().st_mtime_ns for f in (out / "cog_rgb").iterdir()}
    assert run([scene], out, cfg(), log=quiet).to_dict()["counts"]["skipped"] == 1

    rep = run([scene], out, cfg(heatmap_scale=0.5), log=quiet).to_dict()
    assert rep["counts"]["failed"] == 1 and rep["failed"][0]["error_kind"] == "exists"
    assert "--overwrite" in rep["failed"][0]["reason"]
    assert {f.name: f.stat().st_mtime_ns for f in (out / "cog_rgb").iterdir()} == before

    said: list[str] = []
    rep = run([scene], out, cfg(heatmap_scale=0.5, overwrite=True), log=said.append).to_dict()
    assert rep["counts"]["done"] == 1
    what = "made with other settings ([output] heatmap_scale 0.25 -> 0.5)"  # what was replaced, and why
    assert rep["done"][0]["replaced"] == what and f"cog_rgb: redoing its finished outputs, {what}" in said, said
    rep = run([scene], out, cfg(heatmap_scale=0.5, overwrite=True), log=quiet).to_dict()
    assert rep["done"][0]["replaced"] == "as --overwrite asks (made with the same scene, settings and model)"
    second = json.loads((out / "cog_rgb" / "run.json").read_text())
    assert second["fingerprint"] != first["fingerprint"] and second["config"]["output"]["heatmap_scale"] == 0.5
    assert not any(p.name.startswith(".cog_rgb.old") for p in out.iterdir())  # the replaced folder is gone


def test_update_redoes_only_what_changed_and_equivalent_settings_are_the_same(tmp_path, scene_path):
    """A nightly job into one OUT: settings that give the same outputs (the stride equal to the
    tile size, the bands the automatic pick chose) skip finished scenes; --update redoes the
    scene whose file changed and skips the other; it never replaces another scene file's
    outputs of the same name."""
    import os
    import shutil

    from conftest import invoke

    src, out, args = _two_scenes_done(tmp_path, scene_path)
    stamps = lambda n: {f.name: f.stat().st_mtime_ns for f in (out / n).iterdir()}  # noqa: E731
    before = {n: stamps(n) for n in ("a", "b")}
    for same in (["--stride", "128"], ["--bands", "1,2,3"], ["--update"], ["--allow-pixel-space"]):  # the last: they have a CRS
        res = invoke(["run", src, "-o", out, *args, *same])
        assert res.exit_code == 0 and read(out)["counts"]["skipped"] == 2, (same, res.output)
    os.utime(src / "a.tif", (1e9, 1e9))  # a's file changed
    res = invoke(["run", src, "-o", out, *args])
    assert res.exit_code == 3 and "pass --update to redo the scenes that changed" in res.output, res.output
    res = invoke(["run", src, "-o", out, *args, "--update"])
    rep = read(out)
    assert res.exit_code == 0 and [d["unit"] for d in rep["done"]] == ["a"] and rep["counts"]["skipped"] == 1
    what = "made from another version of the scene file (modified "  # what changed, from when to when
    assert "-> 2001-09-09T01:46:40Z)" in rep["done"][0]["replaced"], rep["done"][0]["replaced"]
    assert rep["done"][0]["replaced"].startswith(what) and f"a: redoing its finished outputs, {what}" in res.output
    assert stamps("b") == before["b"] and stamps("a") != before["a"]
    other = tmp_path / "other"
    other.mkdir()
    shutil.copyfile(src / "b.tif", other / "a.tif")  # another scene named a
    res = invoke(["run", other / "a.tif", "-o", out, *args, "--update"])
    assert res.exit_code == 6 and f"of another scene file of the same name ({src / 'a.tif'})" in res.output
    assert "if this is that file moved, run it alone with --overwrite" in res.output, res.output
    fresh = tmp_path / "out2"  # the other way round: bands and stride given first, then left to the defaults
    assert invoke(["run", src / "b.tif", "-o", fresh, *args, "--bands", "1,2,3", "--stride", "128"]).exit_code == 0
    res = invoke(["run", src / "b.tif", "-o", fresh, *args])
    assert res.exit_code == 0 and read(fresh)["counts"]["skipped"] == 1, res.output
    # a setting that does change them: the message names it alone, not the bands that are alike
    res = invoke(["run", src / "b.tif", "-o", fresh, *args, "--min-valid", "0.3"])
    assert res.exit_code == 6 and "made with other settings ([tiling] min_valid_fraction 0.5 -> 0.3) exist" in res.output, \
        res.output


def test_a_finished_scene_whose_output_files_were_deleted_is_redone(tmp_path, scene_path):
    """Output files deleted by hand: the next run redoes the scene (same settings, so without
    --update), says which files were missing, and the others are left as they were."""
    from conftest import invoke

    src, out, args = _two_scenes_done(tmp_path, scene_path)
    listed = json.loads((out / "a" / "run.json").read_text())["outputs"]
    b_before = {f.name: f.stat().st_mtime_ns for f in (out / "b").iterdir()}
    (out / "a" / "tiles.parquet").unlink()
    (out / "a" / "heatmap.tif").unlink()
    res = invoke(["run", src, "-o", out, *args])
    rep = read(out)
    assert res.exit_code == 0 and [d["unit"] for d in rep["done"]] == ["a"] and rep["counts"]["skipped"] == 1
    what = "as heatmap.tif, tiles.parquet are missing (deleted since)"
    assert rep["done"][0]["replaced"].startswith(what) and f"a: redoing its finished outputs, {what}" in res.output
    assert sorted(p.name for p in (out / "a").iterdir()) == sorted([*listed, "run.json"])
    assert {f.name: f.stat().st_mtime_ns for f in (out / "b").iterdir()} == b_before


def test_a_scene_finished_in_bands_or_whole_is_not_redone_when_the_scene_count_changes(tmp_path, scene_path):
    """Fewer scenes than shards band a scene; a scene that arrives (or leaves) between runs
    changes that: a scene finished as row bands is not redone whole, nor one finished whole
    redone as bands (each skipped, and said why); the new scene is done."""
    import shutil

    from conftest import invoke

    src, out = tmp_path / "scenes", tmp_path / "out"
    src.mkdir()
    args = ["--tile-size", "128", "--units", "px", "--no-progress", "-o", out]
    shutil.copyfile(scene_path("rasterio/RGB.byte.tif"), src / "a.tif")  # 6 tile rows: 2 bands on 2 shards

    def shards() -> list[dict]:
        for i in range(2):
            res = invoke(["run", src, *args, "--shard", f"{i}/2"])
            assert res.exit_code == 0, res.output
        return [json.loads((out / f"report-shard-000{i}-of-0002.json").read_text()) for i in range(2)]

    shards()
    bands = sorted(p.name for p in (out / "a").iterdir())
    assert bands == ["rows-00000-00003", "rows-00003-00006"]
    shutil.copyfile(src / "a.tif", src / "b.tif")  # two scenes on two shards: whole scenes now
    reps = shards()
    skipped = [u for r in reps for u in r["skipped"]]
    assert [u["unit"] for u in skipped] == ["a"] and "already complete as 2 row bands" in skipped[0]["reason"]
    band_counts = [json.loads(p.read_text())["counts"] for p in sorted((out / "a").glob("rows-*/run.json"))]
    assert skipped[0]["counts"]["tiles_classified"] == sum(c["tiles_classified"] for c in band_counts) > 0
    assert [u["unit"] for r in reps for u in r["done"]] == ["b"]
    assert sorted(p.name for p in (out / "a").iterdir()) == bands  # no whole output beside the bands
    (src / "a.tif").unlink()  # b alone again: banded, and finished whole
    reps = shards()
    assert [u["unit"] for r in reps for u in r["done"]] == []
    assert sorted(u["unit"] for r in reps for u in r["skipped"]) == ["b/rows-00000-00003", "b/rows-00003-00006"]
    assert all("as its scene's whole output" in u["reason"] for r in reps for u in r["skipped"])
    assert not list((out / "b").glob("rows-*"))


def test_a_rerun_asking_for_fewer_outputs_skips_what_is_finished(tmp_path, scene_path):
    """Finished with every output, run again with --no-quicklook --no-gpkg --no-styles (a cron
    line trimmed): what it asks for is there, so nothing is redone or refused; asking for more
    than was made is still a change of settings (--update redoes it)."""
    from conftest import invoke

    src, out, args = _two_scenes_done(tmp_path, scene_path)
    before = {f: f.stat().st_mtime_ns for f in out.rglob("*") if f.is_file() and "report" not in f.name}
    res = invoke(["run", src, "-o", out, *args, "--no-quicklook", "--no-gpkg", "--no-styles"])
    assert res.exit_code == 0 and read(out)["counts"] == {"done": 0, "skipped": 2, "failed": 0}, res.output
    assert {f: f.stat().st_mtime_ns for f in before} == before
    res = invoke(["run", src, "-o", out, *args, "--no-quicklook", "--overwrite"])
    assert read(out)["counts"]["done"] == 2 and not (out / "a" / "quicklook.png").exists()  # made without it now
    res = invoke(["run", src, "-o", out, *args])
    assert res.exit_code == 6 and "[output] quicklook" in res.output, res.output


def test_units_that_cut_the_same_tiles_are_the_same_settings(tmp_path, scene_path):
    """A 5 m scene, where units "auto" keeps 128 px tiles: --units px, or 640 m tiles in metres,
    cut the same tiles, so a nightly job given them skips the finished scene (it was refused
    as made with other settings, and --update redid it for nothing); 96 px tiles do not."""
    from conftest import invoke

    naip, out = scene_path("opengeos-naip/m_4709963_se_14_1_20100629.tif"), tmp_path / "out"
    args = ["-o", out, "--bands", "1,2,3", "--no-progress"]
    assert invoke(["run", naip, *args]).exit_code == 0
    for same in (["--units", "px"], ["--units", "m", "--tile-size", "640"]):
        res = invoke(["run", naip, *args, *same])
        assert res.exit_code == 0 and read(out)["counts"]["skipped"] == 1, (same, res.output)
    res = invoke(["run", naip, *args, "--units", "px", "--tile-size", "96"])
    assert res.exit_code == 6 and "[tiling] tile_size 128 -> 96" in res.output, res.output


def test_a_rerun_with_another_model_is_refused_and_update_redoes_it_with_that_model(tmp_path, scene_path):
    """A model retrained and run again into the same OUT with the same settings: the finished
    scene is not taken for this model's (exit 6, naming the model it was made with), its files
    are left as they were; --update redoes it, and run.json records the new model."""
    import hashlib

    from conftest import invoke, tiny_model_file, tree_hashes

    a = tiny_model_file(tmp_path / "a.keras", ["field", "water"], 32, seed=1, model_id="mine-a")
    b = tiny_model_file(tmp_path / "b.keras", ["field", "water"], 32, seed=2, model_id="mine-b")
    sha = {m: hashlib.sha256(m.read_bytes()).hexdigest() for m in (a, b)}
    scene, out = scene_path("rio-tiler/cog_rgb.tif"), tmp_path / "out"
    args = ["-o", out, "--tile-size", "128", "--units", "px", "--no-progress"]
    assert invoke(["run", scene, "--model", a, *args]).exit_code == 0
    res = invoke(["run", scene, "--model", a, *args])  # the same model: skipped
    assert res.exit_code == 0 and read(out)["counts"]["skipped"] == 1, res.output
    before = {k: v for k, v in tree_hashes(out).items() if not k.startswith("report")}
    res = invoke(["run", scene, "--model", b, *args])
    what = f"made with another model (mine-a, sha256 {sha[a][:12]})"
    assert res.exit_code == 6 and f"finished outputs {what} exist: pass --update" in res.output, res.output
    assert read(out)["counts"] == {"done": 0, "skipped": 0, "failed": 1}
    assert {k: v for k, v in tree_hashes(out).items() if not k.startswith("report")} == before
    res = invoke(["run", scene, "--model", b, *args, "--update"])
    rep = read(out)
    assert res.exit_code == 0 and [d["unit"] for d in rep["done"]] == ["cog_rgb"], res.output
    assert rep["done"][0]["replaced"] == what and f"cog_rgb: redoing its finished outputs, {what}" in res.output
    made = json.loads((out / "cog_rgb" / "run.json").read_text())["model"]
    assert made["id"] == "mine-b" and made["sha256"] == sha[b]


def _two_scenes_done(tmp_path: Path, scene_path) -> tuple[Path, Path, list[str]]:
    """Scenes a.tif and b.tif (one real scene twice) run into OUT: (scene folder, OUT, run options)."""
    import shutil

    from conftest import invoke

    src = tmp_path / "scenes"
    src.mkdir()
    for name in ("a", "b"):
        shutil.copyfile(scene_path("rio-tiler/cog_rgb.tif"), src / f"{name}.tif")
    out = tmp_path / "out"
    args = ["--tile-size", "128", "--units", "px", "--no-progress"]
    assert invoke(["run", src, "-o", out, *args]).exit_code == 0
    return src, out, args


def read(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def test_outputs_an_earlier_release_computed_otherwise_are_not_taken_for_this_ones(tmp_path, scene_path, monkeypatch):
    """Scenes finished by a tilescan whose results for the same settings differ (run.json's
    results_version lower: here two scenes, one of them run without it at all, as releases
    before it): a rerun refuses them with what differs and what to do, leaving them as they are;
    collect warns that it holds them; --update redoes them."""
    from conftest import invoke, tree_hashes
    from tilescan import layout

    monkeypatch.setattr(layout, "RESULTS_VERSION", 1)
    src, out, args = _two_scenes_done(tmp_path, scene_path)
    monkeypatch.undo()
    old = json.loads((out / "b" / "run.json").read_text())
    assert old["results_version"] == 1
    del old["results_version"]  # as written before run.json had it
    (out / "b" / "run.json").write_text(json.dumps(old))
    before = tree_hashes(out)
    res = invoke(["run", src, "-o", out, *args])
    what = ("made by an earlier tilescan, whose results for the same scene, settings and model may differ (results "
            f"version 1; this one's {layout.RESULTS_VERSION}: since, {layout.RESULTS_CHANGES[2]}; "
            f"{layout.RESULTS_CHANGES[3]}) exist: pass --update")
    assert res.exit_code == 6 and res.output.count(what) == 2, res.output
    assert {k: v for k, v in tree_hashes(out).items() if k != "report.json"} == \
        {k: v for k, v in before.items() if k != "report.json"}  # left as they were
    res = invoke(["collect", out, "--no-gpkg", "--no-styles"])
    assert res.exit_code == 0 and "warning: collect: 2 scene(s) were made by an earlier tilescan, whose results for " \
        "the same settings and model may differ from this one's (a, b)" in res.output, res.output
    res = invoke(["run", src, "-o", out, *args, "--update"])
    assert res.exit_code == 0 and read(out)["counts"]["done"] == 2, res.output
    assert {json.loads((out / u / "run.json").read_text())["results_version"] for u in "ab"} == {layout.RESULTS_VERSION}
    assert "made by an" not in invoke(["collect", out, "--no-gpkg", "--no-styles"]).output


def test_version_2_outputs_of_a_north_up_scene_stay_current_and_a_south_up_ones_are_redone(tmp_path, scene_path,
                                                                                           monkeypatch):
    """Results version 3 turns a south-up scene's tiles north-up for the model and changes
    nothing else: outputs version 2 made of a north-up scene are this release's (a rerun keeps
    them, collect says nothing), a south-up scene's are refused as an earlier release's, and
    --update redoes that one alone."""
    import rasterio
    from affine import Affine

    from conftest import invoke, tree_hashes
    from tilescan import layout

    src = tmp_path / "scenes"
    src.mkdir()
    with rasterio.open(scene_path("opengeos-naip/m_4709963_se_14_1_20190904.tif")) as ds:
        px, profile, t = ds.read((1, 2, 3), window=rasterio.windows.Window(0, 0, 256, 256)), ds.profile, ds.transform
    profile.update(count=3, width=256, height=256, tiled=False)
    for name, a, tr in (("north", px, t), ("south", px[:, ::-1], Affine(t.a, 0, t.c, 0, -t.e, t.f + 256 * t.e))):
        with rasterio.open(src / f"{name}.tif", "w", **{**profile, "transform": tr}) as dst:
            dst.write(np.ascontiguousarray(a))
    out, args = tmp_path / "out", ["--no-progress", "--no-gpkg"]
    monkeypatch.setattr(layout, "RESULTS_VERSION", 2)
    assert invoke(["run", src, "-o", out, *args]).exit_code == 0
    monkeypatch.undo()
    north = tree_hashes(out / "north")
    res = invoke(["run", src, "-o", out, *args])
    assert res.exit_code == 3 and "out/north" not in res.output and "south: finished outputs made by an earlier " \
        f"tilescan, whose results for the same scene, settings and model may differ (results version 2; this one's " \
        f"{layout.RESULTS_VERSION}: since, a scene stored south-up or east-left has its tiles turned north-up for the " \
        "model)" in res.output, res.output
    assert read(out)["counts"]["skipped"] == 1
    res = invoke(["collect", out, "--no-gpkg", "--no-styles"])
    assert res.exit_code == 0 and "1 scene(s) were made by an earlier tilescan" in res.output and "(south)" in res.output
    res = invoke(["run", src, "-o", out, *args, "--update"])
    assert res.exit_code == 0 and read(out)["counts"] == {**read(out)["counts"], "done": 1, "skipped": 1}, res.output
    assert tree_hashes(out / "north") == north
    assert json.loads((out / "south" / "run.json").read_text())["results_version"] == layout.RESULTS_VERSION


def test_outputs_a_later_release_made_are_not_undone_by_update(tmp_path, scene_path, monkeypatch):
    """Outputs of a later tilescan (a higher results version): a rerun with this one, --update
    too, refuses them and says to run that release (--update would put this one's results over
    the newer ones); --overwrite redoes them; collect says which release to collect them with."""
    from conftest import invoke, tree_hashes
    from tilescan import layout

    now = layout.RESULTS_VERSION
    monkeypatch.setattr(layout, "RESULTS_VERSION", now + 1)
    src, out, args = _two_scenes_done(tmp_path, scene_path)
    monkeypatch.undo()
    before = tree_hashes(out)
    for more in ([], ["--update"]):
        res = invoke(["run", src, "-o", out, *args, *more])
        assert res.exit_code == 6 and res.output.count(f"made by a later tilescan (results version {now + 1}; this one's "
                                                       f"{now}) exist: run them with that release (upgrade tilescan), or "
                                                       "pass --overwrite to redo them with this one") == 2, res.output
    assert {k: v for k, v in tree_hashes(out).items() if k != "report.json"} == \
        {k: v for k, v in before.items() if k != "report.json"}
    res = invoke(["collect", out, "--no-gpkg", "--no-styles"])
    assert "2 scene(s) were made by a later tilescan (a, b): collect them with that release" in res.output, res.output
    assert invoke(["run", src, "-o", out, *args, "--overwrite"]).exit_code == 0 and read(out)["counts"]["done"] == 2


def test_what_a_killed_run_left_of_a_unit_no_later_run_does_is_removed(tmp_path, scene_path):
    """A SIGKILLed run's staging folder of a unit whose scene is gone (or of another shard
    count) is removed by the next run into OUT, whatever scenes it has; one whose lock a live
    process holds (being written) is left alone."""
    from tilescan import layout
    from tilescan.config import load_config
    from tilescan.pipeline.run import run

    out = tmp_path / "out"
    staging = out / ".tilescan-staging"
    # units, an old output parked aside by a run killed mid-swap, a killed collect's set and its
    # old one parked aside; and what is not tilescan's
    for name in ("gone", ".rows-00000-00004.gone2", "busy", ".old-20019.cog_rgb", ".collect-19924",
                 ".old-19925.collected", ".old-x.y"):
        (staging / name).mkdir(parents=True)
        (staging / name / "tiles.parquet").write_bytes(b"half")
    (out / ".tilescan-locks").mkdir()
    held = layout.FileLock(out / ".tilescan-locks" / "busy.lock")
    held.acquire()  # as the process writing it holds it
    try:
        notes: list[str] = []
        cfg = load_config(None, {"tiling": {"tile_size": 256}}, environ={})
        assert run([scene_path("rio-tiler/cog_rgb.tif")], out, cfg, log=notes.append).exit_code == 0
        assert sorted(p.name for p in staging.iterdir()) == [".old-x.y", "busy"]
        assert "removed what stopped runs had left in .tilescan-staging: .collect-19924, .old-19925.collected, " \
               ".old-20019.cog_rgb, .rows-00000-00004.gone2, gone" in notes, notes
    finally:
        held.release()
    assert (out / "cog_rgb" / "run.json").is_file()


def test_a_second_run_leaves_the_report_of_the_run_still_at_work(tmp_path):
    """Two runs over one OUT (the same command started twice, cron without its lock wrapper):
    the second leaves report.json to the first, whose process still runs, and says so; once
    that process is gone (killed: its report still says running), the next run's report
    replaces it."""
    import os
    import subprocess
    import sys

    out = tmp_path / "out"
    out.mkdir()
    # a process whose command line is tilescan's, as a run's is, holding OUT's report
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", "tilescan", "run"])
    theirs = {"tilescan": "0", "running": True, "started_at": "2026-12-05T00:00:00+00:00", "pid": holder.pid,
              "host": os.uname().nodename, "shard": [0, 1]}
    (out / "report.json").write_text(json.dumps(theirs))
    try:
        p = bh.tilescan("run", "--no-progress", "-o", out, bh.scene_paths()[0], *bh.ARGS)
        assert p.returncode == 0 and f"another tilescan run (pid {holder.pid}) is writing into" in p.stderr, p.stderr
        assert json.loads((out / "report.json").read_text()) == theirs
        assert (out / bh.UNITS[0] / "run.json").is_file()  # its own work is done all the same
    finally:
        holder.kill()
        holder.wait()
    p = bh.tilescan("run", "--no-progress", "-o", out, bh.scene_paths()[0], *bh.ARGS)
    report = json.loads((out / "report.json").read_text())
    assert p.returncode == 0 and report["exit_code"] == 0 and [u["unit"] for u in report["skipped"]] == [bh.UNITS[0]]
    # the holder killed while the second run works: at its end the report it left to it is nobody's, and it writes its own
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", "tilescan", "run"])
    (out / "report.json").write_text(json.dumps({**theirs, "pid": holder.pid}))
    second = subprocess.Popen([bh.exe(), "run", "--no-progress", "-o", str(out), str(bh.scene_paths()[1]), *bh.ARGS],
                              stderr=subprocess.PIPE, text=True, env=bh.env())
    try:
        for line in second.stderr:
            if f"another tilescan run (pid {holder.pid}) is writing into" in line:
                break
    finally:
        holder.kill()
        holder.wait()
    second.communicate(timeout=300)
    report = json.loads((out / "report.json").read_text())
    assert second.returncode == 0 and "running" not in report and [u["unit"] for u in report["done"]] == [bh.scene_paths()[1].stem]


def test_a_setting_written_another_way_is_the_same_setting(tmp_path, scene_path):
    """--target Farmland, then farmland or its index; --nodata 0, then 0.0 or -0: the same outputs,
    so the rerun skips the scenes (each was refused as 'other settings', exit 6); collect, telling
    what a stopped --update left, takes them as the same too."""
    from conftest import invoke
    from tilescan.model import describe_model

    src, _, args = _two_scenes_done(tmp_path, scene_path)
    out = tmp_path / "out2"
    index = describe_model(None).classes.index("Farmland")
    assert invoke(["run", src, "-o", out, *args, "--target", "Farmland", "--nodata", "0"]).exit_code == 0
    for again in (["--target", "farmland", "--nodata", "0.0"], ["--target", str(index), "--nodata", "-0"]):
        res = invoke(["run", src, "-o", out, *args, *again])
        assert res.exit_code == 0 and read(out)["counts"]["skipped"] == 2, res.output
    res = invoke(["run", src, "-o", out, *args, "--target", "Forest", "--nodata", "0"])
    assert res.exit_code == 6 and "[cam] target_class 'Farmland' -> 'Forest'" in res.output, res.output
    from tilescan.outputs.finished import made_otherwise

    manifest = json.loads((out / "a" / "run.json").read_text())
    again = {**manifest["config"], "cam": {**manifest["config"]["cam"], "target_class": str(index)},
             "tiling": {**manifest["config"]["tiling"], "nodata": "0.0"}}
    assert made_otherwise(manifest, again, manifest["model"]["sha256"]) is None
    again["cam"]["target_class"] = "Forest"
    assert made_otherwise(manifest, again, None) == "made with other settings ([cam] target_class 'Farmland' -> 'Forest')"


def test_a_stretch_setting_a_scene_does_not_use_shapes_none_of_its_outputs(tmp_path, scene_path):
    """Percentiles changed, or scaling = dtype for auto: a uint8 scene (auto stretches it by its
    dtype's range) is still complete; the same over a 16-bit copy of it (auto stretches that by
    percentiles) is refused as other settings, and so is scaling = percentile for the uint8 scene."""
    import rasterio
    from conftest import invoke

    src, out, args = _two_scenes_done(tmp_path, scene_path)
    with rasterio.open(src / "a.tif") as ds:
        profile, data = {**ds.profile, "dtype": "uint16", "compress": "deflate", "photometric": "rgb"}, ds.read().astype("uint16") * 257
    wide = tmp_path / "wide"
    wide.mkdir()
    with rasterio.open(wide / "w.tif", "w", **profile) as ds:
        ds.write(data)
    assert invoke(["run", wide, "-o", out, *args]).exit_code == 0
    configs = {}
    for name, text in {"pct": "percentiles = [1, 99]", "dtype": 'scaling = "dtype"',
                       "percentile": 'scaling = "percentile"'}.items():
        configs[name] = tmp_path / f"{name}.toml"
        configs[name].write_text(f"[tiling]\n{text}\n")
    for name in ("pct", "dtype"):
        res = invoke(["run", src, "-o", out, *args, "--config", configs[name]])
        assert res.exit_code == 0 and read(out)["counts"]["skipped"] == 2, res.output
    res = invoke(["run", src, "-o", out, *args, "--config", configs["percentile"]])
    assert res.exit_code == 6 and "[tiling] scaling 'auto' -> 'percentile'" in res.output, res.output
    res = invoke(["run", wide, "-o", out, *args, "--config", configs["percentile"]])
    assert res.exit_code == 0 and read(out)["counts"]["skipped"] == 1, res.output  # auto was percentiles for it
    res = invoke(["run", wide, "-o", out, *args, "--config", configs["pct"]])
    assert res.exit_code == 6 and "[tiling] percentiles [2.0, 98.0] -> [1.0, 99.0]" in res.output, res.output
    from tilescan.outputs.finished import made_otherwise

    manifest = json.loads((out / "a" / "run.json").read_text())
    again = {**manifest["config"], "tiling": {**manifest["config"]["tiling"], "percentiles": [1.0, 99.0]}}
    assert made_otherwise(manifest, again, None) is None  # collect, on what a stopped --update left
