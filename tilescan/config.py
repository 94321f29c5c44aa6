"""Configuration: frozen dataclasses loaded from TOML, environment and flags.

Precedence, highest first: command-line flag > ``TILESCAN_<SECTION>__<KEY>`` environment
variable > config file (``--config``) > the defaults below (also in ``configs/default.toml``).
Every value is checked when the config is built; an error names the key and its source (the
file path, the variable, or the flag), which each section keeps (:meth:`Config.origin`) for
later checks (tiling, the model) to name too. No Keras import here.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
import shlex
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping, Sequence

from .config_values import coerce, is_nodata_setting, nodata_key
from .errors import ConfigError

ENV_PREFIX = "TILESCAN_"
FLAGS_SOURCE = "command-line flags"
CODE_SOURCE = "arguments given in code"  # overrides from Python (tilescan.run's keywords), not from flags

# The CAM method names, kept here so the CLI can list them without importing tilescan.explain.cam
# (tests/test_cli.py checks they equal tilescan.explain.cam.CAM_METHODS).
CAM_METHOD_NAMES = ("gradcam", "gradcam++", "hirescam", "xgradcam", "layercam", "eigencam", "scorecam")

#: How figures and quicklooks name each CAM method.
CAM_METHOD_TITLES = {"gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++", "hirescam": "HiResCAM", "xgradcam": "XGrad-CAM",
                     "layercam": "LayerCAM", "eigencam": "Eigen-CAM", "scorecam": "Score-CAM"}


def _toml_text(value: Any) -> str:
    """A value as it would be written in the TOML file."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_text(v) for v in value) + "]"
    return str(value)


class _Section:
    """What every config section shares: where each of its values came from.

    The origins are a plain attribute, not a dataclass field, so they stay out of
    equality, ``to_dict()`` / ``asdict()`` and run fingerprints.
    """

    SECTION: ClassVar[str] = ""

    def origin(self, key: str) -> str:
        """How the user set ``key``, for messages: ``--bands 4,2,1``,
        ``TILESCAN_TILING__BANDS=4,2,1``, ``[tiling] bands = [4, 2, 1] in my.toml``, or
        ``[tiling] bands = [4, 2, 1]`` for a default or a value given in code."""
        given = getattr(self, "_origins", {}).get(key)
        return given or f"[{self.SECTION}] {key} = {_toml_text(getattr(self, key))}"


@dataclass(frozen=True)
class TilingConfig(_Section):
    SECTION: ClassVar[str] = "tiling"

    tile_size: int = 128
    """Tile edge in scene pixels (or metres when ``units = "m"``)."""
    stride: int = 0
    """Step between tile origins; 0 means ``tile_size`` (no overlap)."""
    units: str = "auto"
    """``auto`` (scene pixels where that puts the model at its ground scale, else ground
    units at the nearest edge of the model's range), ``px`` or ``m``: unit of
    ``tile_size`` and ``stride``."""
    min_valid_fraction: float = 0.5
    """Tiles with a smaller fraction of valid (not nodata / not masked) pixels are skipped."""
    nodata: str = "file"
    """The scenes' nodata value: ``file`` (each file's own), a number (every band's, in place of
    the file's, as ``gdal_translate -a_nodata`` would set it), or ``none`` (the files' nodata
    ignored; an alpha band, an internal mask or NaN still marks pixels invalid)."""
    bands: tuple[int, ...] = ()
    """1-based band indexes fed to the model in its band order; empty = auto
    (first 3 bands, or the RGB bands named by the file's colour interpretation)."""
    scaling: str = "auto"
    """``auto`` (uint8 → /255, others → percentile stretch), ``dtype`` (divide by the dtype
    maximum), ``percentile``, ``range`` (``value_range``), or ``none`` (values are 0..1)."""
    percentiles: tuple[float, float] = (2.0, 98.0)
    """Low/high percentiles of the per-band stretch (computed once per scene)."""
    value_range: tuple[float, ...] = ()
    """With ``scaling = "range"``: the values stretched to 0 and 1, ``[low, high]`` or a pair per
    model band; one stretch for all scenes (16-bit chips stretched each alone label alike ground apart)."""
    resample_to_gsd: bool = False
    """Resample tiles so their ground sample distance matches the model's native GSD."""
    allow_pixel_space: bool = False
    """Process scenes without a CRS/geotransform in pixel coordinates (with a warning)."""


@dataclass(frozen=True)
class InferenceConfig(_Section):
    SECTION: ClassVar[str] = "inference"

    batch_size: int = 32
    pipeline: str = "auto"
    """How reading overlaps the model. ``lockstep``: each batch is read between model calls,
    GDAL decoding its blocks on every core while the writer thread drains the previous
    batch; the model then has the cores to itself. ``overlap``: ``reader_threads`` read
    ahead while the model runs. ``auto``: lockstep when the model runs on the CPU (on a
    shared CPU every core the readers take stalls the model's threads: measured in
    benchmarks/README.md), overlap on a GPU."""
    reader_threads: str = "auto"
    """Reader threads with ``pipeline = "overlap"`` (a number, or ``auto``). Each reads whole
    bands of block rows with its own GDAL handle, so no block is decoded twice whatever their
    number. ``auto``: one per usable core when the model runs on an accelerator (the host
    side then scales with the cores), 1 when it runs on the CPU (there more readers steal the
    model's cores: benchmarks/README.md)."""
    reader_processes: bool = False
    """With ``pipeline = "overlap"``: each reader decodes and scales in a helper process of its
    own, writing the model input into memory shared with the run, and the scenes open in one
    more, so reading and opening hold none of the run's GIL (local files, on Linux;
    benchmarks/README.md). Off: reader threads and the opener thread in the run's process."""
    output_workers: int = 0
    """Helper processes that write each unit's GeoParquet, GeoPackage, label COG, quicklook and
    QGIS files (0: the run's own threads). Those writers hold Python's GIL, so with many small
    scenes on a GPU host, threads stop scaling at a couple of cores and processes do not
    (benchmarks/README.md); on a CPU the model needs every core and 0 costs the least."""
    queue_size: int = 4
    jit_compile: str = "auto"
    """``auto``, ``true`` or ``false``: XLA-compile the model + CAM step."""
    precision: str = "float32"
    """``float32``, ``bf16`` (bfloat16 compute, float32 logits and CAMs), or ``auto``
    (bf16 where measured faster: TensorFlow on a CPU with AVX512_BF16 or AMX)."""
    model_streams: str = "auto"
    """Model + CAM steps computed at once, each on its own batch (a number, or ``auto``: 2
    for TensorFlow on a CPU of two or more usable cores, where a second step fills the cores
    while the first waits at its sync points; 1 elsewhere). The same results either way
    (benchmarks/README.md)."""
    switch_interval_ms: str = "auto"
    """How long a thread of the run may keep Python's GIL from another that waits for it
    (``sys.setswitchinterval``, in ms; a number, or ``auto``). Each call to the model's device
    lets the GIL go, and getting it back waits out this interval whenever a reader or the
    writer runs Python code meanwhile. ``auto``: 0.5 with the model on an accelerator, Python's
    own (5) on the CPU (benchmarks/README.md). Set back when the run ends."""


@dataclass(frozen=True)
class CamConfig(_Section):
    SECTION: ClassVar[str] = "cam"

    method: str = "gradcam"
    layer: str = ""
    """Target layer name; empty = the model's default CAM layer (last conv block)."""
    target_class: str = ""
    """Class name or index to explain; empty = the predicted class of each tile."""


@dataclass(frozen=True)
class OutputConfig(_Section):
    SECTION: ClassVar[str] = "output"

    heatmap_scale: float = 0.25
    """Heatmap raster resolution as a fraction of the scene's (1.0 = scene grid)."""
    quicklook: bool = True
    quicklook_size: int = 1024
    gpkg: bool = True
    """Also write ``tiles.gpkg`` per scene: GeoPackage 1.2 with an R-tree, which every QGIS
    and GDAL >= 2.2 reads (GeoParquet needs GDAL >= 3.8 built with Arrow)."""
    styles: bool = True
    """Write QGIS styles (``.qml``) beside the outputs and a QGIS project per scene."""
    compress: str = "deflate"
    overwrite: bool = False
    update: bool = False
    """Redo the scenes whose finished outputs were made from another version of the scene
    file, other settings or another model (``overwrite`` without redoing the rest)."""


@dataclass(frozen=True)
class TrainConfig(_Section):
    SECTION: ClassVar[str] = "train"

    epochs: int = 40
    batch_size: int = 64
    image_size: int = 128
    optimizer: str = "adamw"
    learning_rate: float = 2e-3
    warmup_epochs: int = 2
    schedule: str = "cosine"
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    patience: int = 8
    min_delta: float = 0.0
    mixed_precision: str = "auto"
    """``auto`` (bf16 where the CPU/GPU does it fast), ``bf16``, ``float32``."""
    augment: bool = True
    crop_scale: tuple[float, float] = (0.6, 1.0)
    color_jitter: float = 0.2
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    seed: int = 20261126
    workers: int = 2
    gsd_m: tuple[float, ...] = ()
    """Ground sample distance of the training images as stored (metres per pixel: one value
    or [finest, coarsest]); recorded in the model as its scale range. Empty = unknown."""
    init: str = ""
    """Parent model to fine-tune from: ``default`` (the packaged model) or a .keras file;
    empty = train from scratch."""
    freeze_epochs: int = 0
    """With ``init``: epochs that train only the new head before the whole model."""
    finetune_lr: float = 0.0
    """With ``init``: peak learning rate once the backbone trains; 0 = learning_rate / 10."""
    class_colors: str = ""
    """A file of the legend's colours (a QGIS .qml style, a colour map, JSON, or lines
    ``name,#rrggbb``), stored in the model for its outputs; empty = tilescan's palette."""


@dataclass(frozen=True)
class Config:
    tiling: TilingConfig = field(default_factory=TilingConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    cam: CamConfig = field(default_factory=CamConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {f.name: _section_dict(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def replace(self, section: str, **values: Any) -> "Config":
        """A copy with ``values`` set in ``section`` (checked like any other source; run()'s short
        names too, ``min_valid``); the other values keep their origins."""
        values = {KEYWORD_ALIASES[k][1] if KEYWORD_ALIASES.get(k, ("",))[0] == section else k: v for k, v in values.items()}
        plain = {(section, k): f"[{section}] {k} = {_toml_text(v)}" for k, v in values.items()}  # errors name the code
        cfg = build_config(self.to_dict(), {section: values}, source=["argument", CODE_SOURCE], origins=[None, plain])
        for name in SECTIONS:
            kept = {k: v for k, v in getattr(getattr(self, name), "_origins", {}).items() if name != section or k not in values}
            object.__setattr__(getattr(cfg, name), "_origins", {**getattr(getattr(cfg, name), "_origins", {}), **kept})
        return cfg

    def origin(self, section: str, key: str) -> str:
        """Where ``[section] key`` came from, for messages (see :meth:`_Section.origin`)."""
        return getattr(self, section).origin(key)


KEYWORD_ALIASES = {"cam": ("cam", "method"), "min_valid": ("tiling", "min_valid_fraction"),  # run()'s short names
                   "target": ("cam", "target_class"), "threads": ("inference", "reader_threads")}

SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(Config)}  # type: ignore[misc]

_CHOICES = {
    ("tiling", "units"): {"auto", "px", "m"},
    ("tiling", "scaling"): {"auto", "dtype", "percentile", "range", "none"},
    ("inference", "jit_compile"): {"auto", "true", "false"},
    ("inference", "precision"): {"auto", "float32", "bf16"},
    ("inference", "pipeline"): {"auto", "lockstep", "overlap"},
    ("output", "compress"): {"deflate", "lzw", "zstd", "none"},
    ("train", "optimizer"): {"adamw", "adam", "sgd"},
    ("train", "schedule"): {"cosine", "constant"},
    ("train", "mixed_precision"): {"auto", "bf16", "float32"},
}


#: Settings read without regard to case ("GradCAM", "PX"), kept as their lower-case name.
_CASELESS = {*_CHOICES, ("cam", "method"), ("inference", "reader_threads"), ("inference", "model_streams"),
             ("inference", "switch_interval_ms")}


def _section_dict(obj: Any) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


RERUN_KEYS = ("overwrite", "update")  # [output] keys that say what to redo, not how outputs are made


def output_shaping(config: dict) -> dict:
    """The settings that shape a unit's outputs, from a resolved config as a dict (``to_dict``,
    run.json's ``config``): ``[tiling]``, ``[cam]``, ``[output]`` but :data:`RERUN_KEYS`, and a
    precision other than float32 (bf16 changes the numbers slightly). The default nodata is
    left out, so outputs of releases before that setting read the same."""
    tiling = dict(config.get("tiling") or {})
    if nodata_key(tiling.get("nodata", "file")) == "file":
        tiling.pop("nodata", None)
    else:
        tiling["nodata"] = nodata_key(tiling["nodata"])
    if not tiling.get("value_range"):  # nor an unset range (outputs before it resume)
        tiling.pop("value_range", None)
    output = {k: v for k, v in (config.get("output") or {}).items() if k not in RERUN_KEYS}
    if output.get("quicklook") is False:  # its size shapes nothing then
        output.pop("quicklook_size", None)
    shaping = {"tiling": tiling, "cam": config.get("cam"), "output": output}
    precision = (config.get("inference") or {}).get("precision", "float32")
    if precision != "float32":
        shaping["precision"] = precision
    return shaping


def resolve_target(target: str | int | None, classes: Sequence[str], origin: str | None = None) -> int | None:
    """A class name (exact, else case-insensitive and without spaces at its ends) or index -> class
    index; None -> None.
    Raises ConfigError listing the valid names (after ``origin``, where the value came from)."""
    try:
        return _class_index(target, classes)
    except ConfigError as exc:
        if origin is None:
            raise
        raise ConfigError(f"{origin}: {exc.message}") from None


def _class_index(target: str | int | None, classes: Sequence[str]) -> int | None:
    if target is None or (isinstance(target, str) and not target.strip()):
        return None
    valid = ", ".join(f"{i}={c}" for i, c in enumerate(classes))
    if isinstance(target, numbers.Integral) and not isinstance(target, bool):  # numpy's integers too
        idx = int(target)
    else:
        if str(target) in classes:  # exact, spaces and all (a class named with a trailing space)
            return list(classes).index(str(target))
        s = str(target).strip()
        if s in classes:
            return list(classes).index(s)
        folded = [i for i, c in enumerate(classes) if c.strip().lower() == s.lower()]
        if len(folded) == 1:
            return folded[0]
        if folded:
            raise ConfigError(f"target class {target!r} matches {', '.join(repr(classes[i]) for i in folded)} but for "
                              "case: give one of them exactly")
        from .layout import class_folder_name

        safe = class_folder_name(s)  # the label's own name, as chips made it a folder's
        if safe in classes:
            return list(classes).index(safe)
        try:
            idx = int(s)
        except ValueError:
            raise ConfigError(f"unknown target class {target!r}; valid classes: {valid}") from None
    if not 0 <= idx < len(classes):
        raise ConfigError(f"target class index {idx} is out of range; valid classes: {valid}")
    return idx


def positive_int(name: str, value: Any) -> int:
    """``value`` of the argument ``name`` as an integer >= 1, else a ConfigError saying so."""
    try:
        n = int(value) if not isinstance(value, bool) and float(value) == int(value) else None
    except (TypeError, ValueError, OverflowError):
        n = None
    if n is None or n < 1:
        raise ConfigError(f"{name} must be a whole number >= 1, got {value!r}")
    return n


def _number(text: str) -> float:
    """A setting's text as a number; NaN where it is none."""
    try:
        return float(text.strip())
    except ValueError:
        return float("nan")


def _check_value_range(t: TilingConfig, fail: Callable[[str, str, str], None]) -> None:
    """``[tiling] value_range``: pairs of low < high, given with ``scaling = "range"`` and only then."""
    v = t.value_range
    if v and t.scaling != "range":
        fail("tiling", "value_range", f"is used only with scaling = range, not {t.scaling!r}: set both")
    if t.scaling == "range" and not v:
        fail("tiling", "scaling", "range needs [tiling] value_range: [low, high], or a pair per model band")
    if len(v) % 2 or any(not lo < hi for lo, hi in zip(v[::2], v[1::2])):
        fail("tiling", "value_range", f"need pairs of low < high, got {list(v)}")


#: Whole-number settings and the least and most each may be.
_BOUNDS = {("tiling", "tile_size"): (1, 2**20), ("inference", "batch_size"): (1, 8192),
           ("inference", "output_workers"): (0, 256), ("inference", "queue_size"): (1, 1024),
           ("output", "quicklook_size"): (16, 2**15), ("train", "epochs"): (1, 10**6), ("train", "batch_size"): (1, 8192),
           ("train", "image_size"): (32, 2**14), ("train", "workers"): (1, 256), ("train", "freeze_epochs"): (0, 10**6),
           ("train", "seed"): (0, 2**32 - 1)}
_BOUNDS_WHY = {"batch_size": " (a batch's tiles are held in memory at once, a short one padded to it)",
               "seed": " (numpy's and Keras' generators take 32-bit seeds)"}
_BOUNDS_WHY_LOW = {"image_size": " (the network halves its input five times: 32 px leave one cell)"}


def _check(cfg: Config, sources: Mapping[tuple[str, str], str]) -> None:
    def flag(section: str, key: str) -> str | None:
        """The flag as typed (``--stride 200``) when the value came from one."""
        if sources.get((section, key)) == FLAGS_SOURCE:
            return getattr(getattr(cfg, section), "_origins", {}).get(key)
        return None

    def fail(section: str, key: str, msg: str) -> None:
        if said := flag(section, key):
            raise ConfigError(f"{said}: {msg}")
        raise ConfigError(f"[{section}] {key}: {msg}", path=sources.get((section, key), "defaults"))

    def other(section: str, key: str, of: str) -> str:
        """``key`` named in a message about ``of``: the flag, or by name when both came
        from the same place, else with where it came from."""
        if said := flag(section, key):
            return said
        if sources.get((section, key), "defaults") == sources.get((section, of), "defaults"):
            return f"{key} ({getattr(getattr(cfg, section), key)})"
        return f"{key} ({cfg.origin(section, key)})"

    for (section, key), allowed in _CHOICES.items():
        v = getattr(getattr(cfg, section), key)
        if v not in allowed:
            fail(section, key, f"must be one of {sorted(allowed)}, got {v!r}")
    for (section, key), (low, high) in _BOUNDS.items():
        v = getattr(getattr(cfg, section), key)
        if not low <= v <= high:
            fail(section, key, f"must be >= {low}, got {v}{_BOUNDS_WHY_LOW.get(key, '')}" if v < low else
                 f"must be <= {high}, got {v}{_BOUNDS_WHY.get(key, '')}")
    if cfg.cam.method not in CAM_METHOD_NAMES:
        fail("cam", "method", f"must be one of {', '.join(CAM_METHOD_NAMES)}, got {cfg.cam.method!r}")
    t = cfg.tiling
    if t.stride < 0:
        fail("tiling", "stride", f"must be >= 0 (0 = tile_size), got {t.stride}")
    if t.stride > t.tile_size:
        fail("tiling", "stride", f"must not exceed {other('tiling', 'tile_size', 'stride')}, got {t.stride}: "
             "the pixels between tiles would never be classified")
    if not 0.0 <= t.min_valid_fraction <= 1.0:
        fail("tiling", "min_valid_fraction", f"must be in [0, 1], got {t.min_valid_fraction}")
    if any(b < 1 for b in t.bands):
        fail("tiling", "bands", f"band indexes are 1-based, got {list(t.bands)}")
    if not is_nodata_setting(t.nodata):
        fail("tiling", "nodata", f"must be file, none or a number, got {t.nodata!r}")
    lo, hi = t.percentiles
    if not 0.0 <= lo < hi <= 100.0:
        fail("tiling", "percentiles", f"need 0 <= low < high <= 100, got {list(t.percentiles)}")
    _check_value_range(t, fail)
    i = cfg.inference
    for key in ("reader_threads", "model_streams"):
        v = getattr(i, key)
        if v != "auto" and not (v.strip().isdigit() and int(v) >= 1):
            fail("inference", key, f"must be auto or a whole number >= 1, got {v!r}")
    if i.switch_interval_ms != "auto" and not 0.0 < _number(i.switch_interval_ms) <= 1000.0:
        fail("inference", "switch_interval_ms", f"must be auto or a number of ms in (0, 1000], got {i.switch_interval_ms!r}")
    o = cfg.output
    if not 0.0 < o.heatmap_scale <= 1.0:
        fail("output", "heatmap_scale", f"must be in (0, 1], got {o.heatmap_scale}")
    tr = cfg.train
    if tr.learning_rate <= 0:
        fail("train", "learning_rate", f"must be > 0, got {tr.learning_rate}")
    if tr.finetune_lr < 0:
        fail("train", "finetune_lr", f"must be >= 0 (0 = learning_rate / 10), got {tr.finetune_lr}")
    for key in ("patience", "warmup_epochs"):
        if getattr(tr, key) < 0:
            fail("train", key, f"must be >= 0, got {getattr(tr, key)}")
    for key, low, high in (("label_smoothing", 0.0, 0.99), ("weight_decay", 0.0, 1.0), ("min_delta", 0.0, 10.0),
                           ("color_jitter", 0.0, 1.0)):  # each an amount of its own: no larger one means anything
        if not low <= getattr(tr, key) <= high:
            fail("train", key, f"must be in [{low:g}, {high:g}], got {getattr(tr, key)}")
    if not 0.0 < tr.crop_scale[0] <= tr.crop_scale[1] <= 1.0:
        fail("train", "crop_scale", f"need 0 < low <= high <= 1, got {list(tr.crop_scale)}")
    if len(tr.gsd_m) > 2 or any(not g > 0 for g in tr.gsd_m):
        fail("train", "gsd_m", f"need one or two values > 0 (metres per pixel), got {list(tr.gsd_m)}")
    for key in ("val_fraction", "test_fraction"):
        if not 0.0 <= getattr(tr, key) < 1.0:
            fail("train", key, f"must be in [0, 1), got {getattr(tr, key)}")
    if tr.val_fraction + tr.test_fraction >= 1.0:
        fail("train", "test_fraction", f"with {other('train', 'val_fraction', 'test_fraction')} leaves no training "
             f"images: the two must sum below 1, got {tr.test_fraction}")


def build_config(*layers: Mapping[str, Mapping[str, Any]], source: str | list[str] = "defaults",
                 origins: list[Mapping[tuple[str, str], str] | None] | None = None) -> Config:
    """Merge ``layers`` (lowest precedence first) over the defaults and check the result.

    ``source`` names each layer (one string for all, or one per layer) for error messages.
    ``origins`` (one mapping or None per layer) says how each of a layer's values was
    written (``--bands 4,2,1``, ``TILESCAN_TILING__BANDS=4,2,1``); a key a mapping leaves
    out reads ``[tiling] bands = [4, 2, 1]``, and a layer with None (a file) reads
    ``[tiling] bands = [4, 2, 1] in FILE``.
    """
    names = [source] * len(layers) if isinstance(source, str) else list(source)
    texts = list(origins) if origins is not None else [None] * len(layers)
    merged: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    sources: dict[tuple[str, str], str] = {}
    said: dict[str, dict[str, str]] = {s: {} for s in SECTIONS}
    for layer, src, text in zip(layers, names, texts):
        if not isinstance(layer, Mapping):
            raise ConfigError("the config must be a table of sections", path=src)
        for section, values in layer.items():
            if section not in SECTIONS:
                home = [name for name, cls in SECTIONS.items() if section in {f.name for f in dataclasses.fields(cls)}]
                if home and not isinstance(values, Mapping):  # `tile_size = 64` above any [section]
                    raise ConfigError(f"{section} = {values!r} is outside any section: put it under [{home[0]}]", path=src)
                raise ConfigError(
                    f"unknown section [{section}]; known sections: {', '.join(SECTIONS)}", path=src
                )
            if not isinstance(values, Mapping):
                raise ConfigError(f"[{section}] must be a table, got {values!r}", path=src)
            cls = SECTIONS[section]
            hints = typing.get_type_hints(cls)
            keys = [f.name for f in dataclasses.fields(cls)]
            for key, value in values.items():
                if key not in keys:
                    raise ConfigError(f"unknown key [{section}] {key}; known keys: {', '.join(keys)}", path=src)
                v = coerce(section, key, value, hints[key], src)
                merged[section][key] = v.strip().lower() if (section, key) in _CASELESS else v
                sources[(section, key)] = src
                if text is not None and (section, key) in text:
                    said[section][key] = text[(section, key)]
                elif text is not None or src in ("defaults", "argument"):
                    said[section].pop(key, None)  # the plain "[section] key = value"
                else:
                    said[section][key] = f"[{section}] {key} = {_toml_text(value)} in {src}"  # as the file has it
    cfg = Config(**{s: SECTIONS[s](**vals) for s, vals in merged.items()})
    for s in SECTIONS:
        object.__setattr__(getattr(cfg, s), "_origins", said[s])
    _check(cfg, sources)
    return cfg


def read_toml(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    try:
        with p.open("rb") as fh:
            text = fh.read().removeprefix(b"\xef\xbb\xbf")  # Windows Notepad's UTF-8 mark, which TOML has not
        return tomllib.loads(text.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not valid TOML: not UTF-8 text ({exc.reason} at byte {exc.start})", path=str(p)) from None
    except FileNotFoundError:
        raise ConfigError("config file not found", path=str(p)) from None
    except IsADirectoryError:
        raise ConfigError("config path is a directory, not a TOML file", path=str(p)) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}", path=str(p)) from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file: {exc.strerror}", path=str(p)) from None


def env_layer(environ: Mapping[str, str] | None = None) -> tuple[dict[str, dict[str, str]], dict[tuple[str, str], str]]:
    """Settings from ``TILESCAN_<SECTION>__<KEY>`` variables (e.g. ``TILESCAN_TILING__STRIDE``)."""
    environ = os.environ if environ is None else environ
    layer: dict[str, dict[str, str]] = {}
    names: dict[tuple[str, str], str] = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name[len(ENV_PREFIX):]:
            continue
        section, key = name[len(ENV_PREFIX):].lower().split("__", 1)
        layer.setdefault(section, {})[key] = value
        names[(section, key)] = name
    return layer, names


def load_config(
    path: str | os.PathLike | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    environ: Mapping[str, str] | None = None,
    flags: Mapping[tuple[str, str], str] | None = None,
) -> Config:
    """The effective config: defaults < file < environment < ``overrides`` (flags).

    ``flags`` maps ``(section, key)`` to the flag as the user wrote it (``--bands 4,2,1``),
    so messages about an override name the flag instead of ``[section] key``.
    """
    layers: list[Mapping[str, Mapping[str, Any]]] = []
    names: list[str] = []
    texts: list[Mapping[tuple[str, str], str] | None] = []
    if path is not None:
        layers.append(read_toml(path))
        names.append(str(path))
        texts.append(None)
    env, env_names = env_layer(environ)
    given = {(s, k) for s, vals in (overrides or {}).items() if isinstance(vals, Mapping)
             for k, v in vals.items() if v is not None}
    # Each environment variable is its own layer so an error names the variable; one a flag
    # or argument overrides is not read (a bad value there does not stop a run that sets the key)
    for (section, key), var in env_names.items():
        if (section, key) in given:
            continue
        value = env[section][key]
        layers.append({section: {key: value}})
        names.append(f"environment variable {var}")
        texts.append({(section, key): f"{var}={shlex.quote(value)}"})
    if overrides:
        flat = [s for s, vals in overrides.items() if not isinstance(vals, Mapping)]
        if flat:
            home, key = KEYWORD_ALIASES.get(flat[0]) or (flat[0].split("__", 1) if "__" in flat[0] else (next((
                name for name, cls in SECTIONS.items() if flat[0] in {f.name for f in dataclasses.fields(cls)}), "tiling"), flat[0]))
            raise ConfigError(f"overrides are by section, e.g. {{'{home}': {{'{key}': ...}}}}; got {flat[0]!r} "
                              "with a value of its own (tilescan.run() takes such keys as keywords)")
        clean = {s: {k: v for k, v in vals.items() if v is not None} for s, vals in overrides.items()}
        layers.append({s: v for s, v in clean.items() if v})
        names.append(FLAGS_SOURCE if flags is not None else CODE_SOURCE)
        texts.append(dict(flags or {}))
    return build_config(*layers, source=names, origins=texts)
