"""Tests of tilescan.config: defaults, TOML, TILESCAN_* environment, flags, checks.

Precedence, highest first: flag > TILESCAN_<SECTION>__<KEY> > --config file > defaults.
The last test checks the same order through the real CLI, in the run.json it writes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from pathlib import Path

import pytest

from tilescan.config import (
    Config,
    InferenceConfig,
    build_config,
    env_layer,
    load_config,
    read_toml,
)
from tilescan.errors import EXIT_USAGE, ConfigError
from conftest import QUIET_AFFINE, REPO, invoke



def toml(tmp_path: Path, text: str, name: str = "c.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


# ------------------------------------------------------------------------------------
# defaults


def test_default_toml_documents_exactly_the_defaults():
    path = REPO / "configs" / "default.toml"
    data = tomllib.loads(path.read_text())
    # every section and key of the dataclasses is in the file, and nothing else
    want = Config().to_dict()
    assert set(data) == set(want)
    for section, values in want.items():
        assert set(data[section]) == set(values), section
    assert load_config(path, environ={}) == Config()


def test_defaults_without_any_source():
    cfg = load_config(None, None, environ={})
    assert cfg == Config()
    assert cfg.tiling.tile_size == 128 and cfg.tiling.stride == 0 and cfg.tiling.min_valid_fraction == 0.5
    assert cfg.inference.batch_size == 32 and cfg.cam.method == "gradcam" and cfg.output.heatmap_scale == 0.25
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.tiling.tile_size = 3  # type: ignore[misc]


def test_to_dict_roundtrip():
    cfg = build_config({"tiling": {"bands": [3, 2, 1], "percentiles": [1, 99]}, "cam": {"target_class": "Forest"}})
    d = cfg.to_dict()
    assert d["tiling"]["bands"] == [3, 2, 1] and cfg.tiling.bands == (3, 2, 1)
    assert cfg.tiling.percentiles == (1.0, 99.0)
    assert json.loads(json.dumps(d)) == d
    assert build_config(d) == cfg


# ------------------------------------------------------------------------------------
# precedence


def test_precedence_flag_over_env_over_file_over_defaults(tmp_path):
    f = toml(tmp_path, """
[tiling]
tile_size = 64
stride = 32
min_valid_fraction = 0.25
[inference]
batch_size = 4
[output]
heatmap_scale = 0.5
""")
    env = {
        "TILESCAN_TILING__TILE_SIZE": "96",
        "TILESCAN_INFERENCE__BATCH_SIZE": "8",
        "TILESCAN_CAM__METHOD": "hirescam",
    }
    flags = {"tiling": {"tile_size": 200, "stride": None}, "inference": {"batch_size": None}, "output": {"gpkg": True}}
    cfg = load_config(f, flags, environ=env)
    assert cfg.tiling.tile_size == 200  # flag > env > file
    assert cfg.inference.batch_size == 8  # env > file (flag None = not given)
    assert cfg.tiling.stride == 32  # file (flag None)
    assert cfg.tiling.min_valid_fraction == 0.25  # file > default
    assert cfg.output.heatmap_scale == 0.5  # file
    assert cfg.cam.method == "hirescam"  # env > default
    assert cfg.output.gpkg is True  # flag > default
    assert cfg.inference.reader_threads == InferenceConfig().reader_threads and cfg.cam.layer == ""  # defaults
    # each layer alone
    assert load_config(f, environ={}).tiling.tile_size == 64
    assert load_config(None, environ=env).tiling.tile_size == 96
    assert load_config(None, flags, environ={}).tiling.tile_size == 200


def test_env_names_and_unrelated_variables():
    layer, names = env_layer({
        "TILESCAN_TILING__BANDS": "3,2,1",
        "tilescan_ignored__x": "lowercase prefix is not ours",
        "TILESCAN_MODEL": "/some/model.keras",  # a click envvar, not a config key
        "TILESCAN_REQUIRE_DATA": "1",  # the test suite's switch
        "TILESCAN_SHARD_COUNT": "4",
        "PATH": "/usr/bin",
    })
    assert layer == {"tiling": {"bands": "3,2,1"}}
    assert names == {("tiling", "bands"): "TILESCAN_TILING__BANDS"}
    cfg = load_config(None, environ={"TILESCAN_TILING__BANDS": "3 2 1", "TILESCAN_OUTPUT__GPKG": "yes",
                                     "TILESCAN_MODEL": "x", "TILESCAN_REQUIRE_DATA": "1"})
    assert cfg.tiling.bands == (3, 2, 1) and cfg.output.gpkg is True


def test_a_setting_variable_misspelt_is_warned_about(tmp_path):
    """TILESCAN_TILING_TILE_SIZE (one underscore) or TILESCAN_TILE_SIZE (the key alone) is no
    setting: a cron or Kubernetes job with it ran with the default, without a word. The command
    says so, naming the variable it meant; the project's own variables are not warned about."""
    from conftest import invoke, scene

    env = {"TILESCAN_TILING_TILE_SIZE": "64", "TILESCAN_BATCH_SIZE": "8", "TILESCAN_REMOTE_RETRIES": "1",
           "TILESCAN_SHARD_COUNT": "1"}
    res = invoke(["run", scene("rio-tiler/cog_rgb.tif"), "-o", tmp_path / "out", "--units", "px", "--no-progress"], env=env)
    assert res.exit_code == 0, res.output
    assert ("warning: TILESCAN_TILING_TILE_SIZE is not a setting and is ignored: settings are "
            "TILESCAN_<SECTION>__<KEY>, two underscores (did you mean TILESCAN_TILING__TILE_SIZE?)") in res.output
    assert "TILESCAN_BATCH_SIZE is not a setting" in res.output and "TILESCAN_INFERENCE__BATCH_SIZE or " in res.output
    assert "TILESCAN_REMOTE_RETRIES" not in res.output and "TILESCAN_SHARD_COUNT" not in res.output


@pytest.mark.parametrize("text,value", [("1", True), ("true", True), ("ON", True), ("no", False), ("0", False), ("Off", False)])
def test_env_booleans(text, value):
    assert load_config(None, environ={"TILESCAN_OUTPUT__OVERWRITE": text}).output.overwrite is value


@pytest.mark.parametrize("text", ["3,2,1", "3 2 1", "[3, 2, 1]", "[3,2,1]"])
def test_env_lists_as_the_flag_or_toml_writes_them(text):
    assert load_config(None, environ={"TILESCAN_TILING__BANDS": text}).tiling.bands == (3, 2, 1)


def test_real_environment_is_read_by_default(monkeypatch):
    monkeypatch.setenv("TILESCAN_INFERENCE__READER_THREADS", "3")
    assert load_config().inference.reader_threads == "3"
    assert load_config(overrides={"inference": {"reader_threads": 1}}).inference.reader_threads == "1"


# ------------------------------------------------------------------------------------
# errors name the key and the source


def _error(fn, *args, **kw) -> ConfigError:
    with pytest.raises(ConfigError) as err:
        fn(*args, **kw)
    assert err.value.exit_code == EXIT_USAGE == 2
    return err.value


def test_bad_env_value_names_the_variable():
    e = _error(load_config, None, environ={"TILESCAN_TILING__TILE_SIZE": "big"})
    assert "TILESCAN_TILING__TILE_SIZE" in str(e) and "tile_size" in str(e) and "'big'" in str(e)
    e = _error(load_config, None, environ={"TILESCAN_NOPE__X": "1"})
    assert "TILESCAN_NOPE__X" in str(e) and "unknown section [nope]" in str(e)
    e = _error(load_config, None, environ={"TILESCAN_TILING__TILESIZE": "1"})
    assert "unknown key [tiling] tilesize" in str(e) and "tile_size" in str(e)
    # a flag or argument that sets the key wins without reading the variable (a fix needs no unset)
    cfg = load_config(None, {"tiling": {"tile_size": 256}}, environ={"TILESCAN_TILING__TILE_SIZE": "big"})
    assert cfg.tiling.tile_size == 256


def test_bad_file_values_name_the_file(tmp_path):
    f = toml(tmp_path, "[tiling]\ntile_size = 'x'\n")
    e = _error(load_config, f, environ={})
    assert str(f) in str(e) and "[tiling] tile_size" in str(e)
    f = toml(tmp_path, "[tilling]\ntile_size = 3\n", "typo.toml")
    e = _error(load_config, f, environ={})
    assert str(f) in str(e) and "unknown section [tilling]" in str(e) and "tiling" in str(e)
    f = toml(tmp_path, "[tiling]\ntile_size = 3\n[tiling\n", "broken.toml")
    assert "not valid TOML" in str(_error(load_config, f, environ={}))
    assert "not found" in str(_error(read_toml, tmp_path / "missing.toml"))
    assert "directory" in str(_error(read_toml, tmp_path))
    f = toml(tmp_path, "tiling = 3\n", "flat.toml")
    assert "must be a table" in str(_error(load_config, f, environ={}))
    f = toml(tmp_path, "tile_size = 64\n", "no-section.toml")  # a key above its section
    assert "tile_size = 64 is outside any section: put it under [tiling]" in str(_error(load_config, f, environ={}))
    f = toml(tmp_path, "[tiling]\nnodata = false\n", "nodata.toml")
    assert "[tiling] nodata: must be file, none or a number, got 'false'" in str(_error(load_config, f, environ={}))
    f = tmp_path / "latin1.toml"
    f.write_bytes("[tiling]\n# Étang\ntile_size = 64\n".encode("latin-1"))
    assert "not valid TOML: not UTF-8 text" in str(_error(load_config, f, environ={}))


def test_a_config_file_saved_with_a_utf8_mark_is_read(tmp_path):
    """Windows Notepad starts UTF-8 files with a byte-order mark, which TOML does not allow."""
    f = tmp_path / "notepad.toml"
    f.write_bytes(b"\xef\xbb\xbf[tiling]\ntile_size = 64\n")
    assert load_config(f, environ={}).tiling.tile_size == 64


def test_bad_flag_values_name_the_flags():
    """Overrides from the command line name the flags; the same from Python, the code."""
    e = _error(load_config, None, {"output": {"heatmap_scale": 0.0}}, environ={}, flags={})
    assert "command-line flags" in str(e) and "heatmap_scale" in str(e)
    e = _error(load_config, None, {"output": {"heatmap_scale": 0.0}}, environ={})
    assert "arguments given in code" in str(e) and "command-line" not in str(e) and "heatmap_scale" in str(e)


@pytest.mark.parametrize("section,key,value,message", [
    ("tiling", "tile_size", 0, ">= 1"),
    ("tiling", "stride", -1, ">= 0"),
    ("tiling", "min_valid_fraction", 1.5, "[0, 1]"),
    ("tiling", "bands", [0, 1, 2], "1-based"),
    ("tiling", "percentiles", [98, 2], "low < high"),
    ("tiling", "units", "ft", "one of"),
    ("tiling", "scaling", "log", "one of"),
    ("tiling", "allow_pixel_space", "maybe", "true or false"),
    ("tiling", "tile_size", True, "an integer"),
    ("tiling", "tile_size", 1.5, "an integer"),
    ("tiling", "percentiles", [1, 2, 3], "2 values"),
    ("inference", "batch_size", 0, ">= 1"),
    ("inference", "jit_compile", "sometimes", "one of"),
    ("inference", "pipeline", "parallel", "one of"),
    ("output", "heatmap_scale", 1.5, "(0, 1]"),
    ("output", "compress", "jpeg", "one of"),
    ("output", "quicklook_size", 4, ">= 16"),
    ("train", "learning_rate", 0, "> 0"),
    ("train", "crop_scale", [0.9, 0.5], "low <= high"),
])
def test_every_value_is_checked(section, key, value, message):
    e = _error(build_config, {section: {key: value}}, source="somewhere.toml")
    assert f"[{section}] {key}" in str(e) and message in str(e) and "somewhere.toml" in str(e)


def test_replace_is_checked():
    cfg = Config()
    assert cfg.replace("tiling", tile_size=256).tiling.tile_size == 256
    assert cfg.tiling.tile_size == 128
    _error(cfg.replace, "tiling", tile_size=-3)
    _error(cfg.replace, "tiling", no_such_key=1)
    # run()'s short names, as the README writes them; an error names the code, as run()'s do
    assert cfg.replace("tiling", min_valid=0.3).tiling.min_valid_fraction == 0.3
    assert str(_error(cfg.replace, "tiling", tile_size="x")).startswith("arguments given in code: [tiling] tile_size")


def test_numpy_values_are_settings_like_python_ones():
    """A sweep's values from numpy or a DataFrame: np.int64, np.float32, an array of bands."""
    import numpy as np

    from tilescan.config import load_config

    t = load_config(None, {"tiling": {"tile_size": np.int64(256), "min_valid_fraction": np.float32(0.25),
                                      "bands": np.array([3, 2, 1])}}, environ={}).tiling
    assert (t.tile_size, t.min_valid_fraction, t.bands) == (256, 0.25, (3, 2, 1))
    assert type(t.tile_size) is int and type(t.bands[0]) is int
    assert load_config(None, {"tiling": {"min_valid_fraction": np.float32(0.1)}}, environ={}).tiling.min_valid_fraction == 0.1
    assert "expected an integer, got True" in str(_error(load_config, None, {"tiling": {"tile_size": np.bool_(True)}},
                                                         environ={}))
    # a flattened key is shown the form overrides take
    e = _error(load_config, None, {"tiling__stride": 64}, environ={})
    assert "e.g. {'tiling': {'stride': ...}}" in str(e)


# ------------------------------------------------------------------------------------
# the same precedence through the CLI, read back from run.json


@QUIET_AFFINE  # rio-cogeo's own Affine use
def test_cli_precedence_in_run_json(tmp_path, scene_path):
    import rasterio

    scene = scene_path("rio-tiler/cog_rgb.tif")  # 383 x 232
    f = toml(tmp_path, """
[tiling]
tile_size = 64
min_valid_fraction = 0.3
[inference]
batch_size = 4
[output]
heatmap_scale = 0.3
quicklook_size = 256
""")
    env = {"TILESCAN_TILING__TILE_SIZE": "96", "TILESCAN_INFERENCE__BATCH_SIZE": "8", "TILESCAN_OUTPUT__HEATMAP_SCALE": "0.5"}
    out = tmp_path / "out"
    res = invoke(["run", scene, "-o", out, "--config", f, "--tile-size", "400", "--batch-size", "2", "--no-progress"], env=env)
    assert res.exit_code == 0, res.output
    man = json.loads((out / scene.stem / "run.json").read_text())
    c = man["config"]
    assert c["tiling"]["tile_size"] == 400  # flag > env > file
    assert c["inference"]["batch_size"] == 2  # flag > env > file
    assert c["output"]["heatmap_scale"] == 0.5  # env > file
    assert c["tiling"]["min_valid_fraction"] == 0.3 and c["output"]["quicklook_size"] == 256  # file > defaults
    assert c["tiling"]["stride"] == 0 and c["cam"]["method"] == "gradcam"  # defaults
    # and the outputs follow the resolved values
    assert man["counts"]["tiles_total"] == 1
    with rasterio.open(out / scene.stem / "heatmap.tif") as h:
        assert (h.width, h.height) == (math.ceil(383 * 0.5), math.ceil(232 * 0.5))


# ------------------------------------------------------------------------------------
# each value remembers where it came from, for later messages (tiling, the model)


def test_origin_names_flag_variable_file_or_default(tmp_path):
    f = toml(tmp_path, "[tiling]\nbands = [4, 2, 1]\ntile_size = 64\nnodata = 0\n[cam]\ntarget_class = \"Bare Land\"\n",
             "my.toml")
    cfg = load_config(f, {"tiling": {"stride": 32, "min_valid_fraction": None}},
                      environ={"TILESCAN_TILING__TILE_SIZE": "96"}, flags={("tiling", "stride"): "--stride 32"})
    assert cfg.origin("tiling", "stride") == "--stride 32"
    assert cfg.origin("tiling", "tile_size") == "TILESCAN_TILING__TILE_SIZE=96"  # env over file
    assert cfg.origin("tiling", "bands") == f"[tiling] bands = [4, 2, 1] in {f}"
    assert cfg.origin("cam", "target_class") == f'[cam] target_class = "Bare Land" in {f}'
    assert cfg.origin("tiling", "nodata") == f"[tiling] nodata = 0 in {f}"  # as written, though kept as text
    assert cfg.origin("tiling", "min_valid_fraction") == "[tiling] min_valid_fraction = 0.5"  # a default
    # the section answers alone (tiling code gets only a TilingConfig)
    assert cfg.tiling.origin("bands") == cfg.origin("tiling", "bands")
    # origins change neither equality nor the serialised config (run fingerprints)
    same = build_config(cfg.to_dict())
    assert same == cfg and same.to_dict() == cfg.to_dict()
    assert "origin" not in json.dumps(cfg.to_dict()) and set(dataclasses.asdict(cfg.tiling)) == set(cfg.to_dict()["tiling"])
    assert same.origin("tiling", "stride") == "[tiling] stride = 32"
    # replace keeps the others' origins; the replaced value is plain
    moved = cfg.replace("tiling", stride=16)
    assert moved.origin("tiling", "bands") == cfg.origin("tiling", "bands") and moved.origin("tiling", "stride") == "[tiling] stride = 16"


def test_origin_key_is_not_a_config_key(tmp_path):
    for key in ("origins", "_origins", "SECTION"):
        e = _error(build_config, {"tiling": {key: 1}}, source="x.toml")
        assert f"unknown key [tiling] {key}" in str(e)


def test_checks_name_the_flags_they_came_from(tmp_path):
    flags = {("tiling", "stride"): "--stride 100", ("tiling", "tile_size"): "--tile-size 64"}
    e = _error(load_config, None, {"tiling": {"stride": 100, "tile_size": 64}}, environ={}, flags=flags)
    assert str(e).startswith("--stride 100: must not exceed --tile-size 64")
    f = toml(tmp_path, "[tiling]\ntile_size = 64\n")
    e = _error(load_config, f, {"tiling": {"stride": 100}}, environ={}, flags={("tiling", "stride"): "--stride 100"})
    assert str(e).startswith(f"--stride 100: must not exceed tile_size ([tiling] tile_size = 64 in {f})")
    e = _error(load_config, None, environ={"TILESCAN_TILING__STRIDE": "200"})
    assert "TILESCAN_TILING__STRIDE" in str(e) and "tile_size ([tiling] tile_size = 128)" in str(e)
    # both from one file: named as before
    f = toml(tmp_path, "[tiling]\ntile_size = 64\nstride = 100\n", "both.toml")
    assert str(_error(load_config, f, environ={})).startswith(f"{f}: [tiling] stride: must not exceed tile_size (64), got 100")


def test_cam_method_is_checked(tmp_path):
    e = _error(load_config, toml(tmp_path, '[cam]\nmethod = "gradcan"\n'), environ={})
    assert "[cam] method: must be one of gradcam, gradcam++" in str(e)
    # read without regard to case, kept by its name: "GradCAM" and --cam gradcam are one setting
    assert load_config(toml(tmp_path, '[cam]\nmethod = "GradCAM"\n', "case.toml"), environ={}).cam.method == "gradcam"
    got = load_config(toml(tmp_path, '[tiling]\nunits = "PX"\nscaling = "Percentile"\n[inference]\njit_compile = true\n',
                           "case2.toml"), environ={})
    assert (got.tiling.units, got.tiling.scaling, got.inference.jit_compile) == ("px", "percentile", "true")


@pytest.mark.parametrize("key", ["model_streams", "reader_threads"])
def test_streams_and_readers_are_auto_or_a_whole_number(tmp_path, key):
    assert getattr(load_config(environ={}).inference, key) == "auto"
    assert getattr(load_config(toml(tmp_path, f"[inference]\n{key} = 1\n"), environ={}).inference, key) == "1"
    for bad in ("0", "two", "-1", "1.5"):
        e = _error(load_config, None, environ={f"TILESCAN_INFERENCE__{key.upper()}": bad})
        assert f"[inference] {key}: must be auto or a whole number >= 1" in str(e), str(e)
        assert f"TILESCAN_INFERENCE__{key.upper()}" in str(e)


def test_each_setting_is_named_in_its_own_message_and_train_amounts_are_bounded(tmp_path):
    """A bad warmup_epochs or test_fraction was blamed on patience or val_fraction, scaling =
    range without a value_range on "defaults"; label smoothing, weight decay, min_delta and colour
    jitter took any value (a negative min_delta kept early stopping from ever firing)."""
    cases = {"[train]\nwarmup_epochs = -1\n": "[train] warmup_epochs: must be >= 0, got -1",
             "[train]\ntest_fraction = 1.5\n": "[train] test_fraction: must be in [0, 1), got 1.5",
             "[train]\nval_fraction = 0.6\ntest_fraction = 0.5\n": "[train] test_fraction: with val_fraction (0.6) "
             "leaves no training images",
             "[tiling]\nscaling = 'range'\n": "[tiling] scaling: range needs [tiling] value_range",
             "[train]\nlabel_smoothing = 1.5\n": "[train] label_smoothing: must be in [0, 0.99], got 1.5",
             "[train]\nweight_decay = -1\n": "[train] weight_decay: must be in [0, 1], got -1.0",
             "[train]\nmin_delta = -5\n": "[train] min_delta: must be in [0, 10], got -5.0",
             "[train]\ncolor_jitter = -1\n": "[train] color_jitter: must be in [0, 1], got -1.0",
             "[train]\nimage_size = 16\n": "[train] image_size: must be >= 32, got 16 (the network halves its input"}
    for i, (text, said) in enumerate(cases.items()):
        f = toml(tmp_path, text, f"c{i}.toml")
        e = str(_error(load_config, f, environ={}))
        assert said in e and str(f) in e, e


def test_a_quicklook_size_shapes_no_output_without_a_quicklook():
    from tilescan.config import output_shaping

    def shaping(**output):
        return output_shaping(load_config(overrides={"output": output}, environ={}).to_dict())

    assert shaping(quicklook=False, quicklook_size=512) == shaping(quicklook=False, quicklook_size=2048)
    assert shaping(quicklook=True, quicklook_size=512) != shaping(quicklook=True, quicklook_size=2048)


def test_one_setting_written_in_other_cases_or_spellings_shapes_the_same_outputs():
    from tilescan.config import output_shaping

    def shaping(**tiling):
        return output_shaping(load_config(overrides={"tiling": tiling}, environ={}).to_dict())

    assert shaping(nodata="none") == shaping(nodata="None") == shaping(nodata="NONE")
    assert shaping(nodata="0") == shaping(nodata="0.0") == shaping(nodata="-0") != shaping(nodata="1")
    assert shaping(nodata="nan") == shaping(nodata="NaN") and shaping(nodata="file") == shaping(nodata="FILE") == shaping()
    got = load_config(environ={"TILESCAN_INFERENCE__READER_THREADS": "AUTO", "TILESCAN_INFERENCE__MODEL_STREAMS": "Auto"})
    assert (got.inference.reader_threads, got.inference.model_streams) == ("auto", "auto")
