"""tilescan: classify every tile of a GeoTIFF scene and explain each label with Grad-CAM.

The Python API (what the ``tilescan`` command calls)::

    import tilescan
    report = tilescan.run(["scene.tif"], "out", tile_size=256, cam="layercam")
    report.exit_code, report.to_dict()["counts"]

- :func:`run` — tile, classify, explain and write scenes (GeoParquet, COGs, quicklook).
- :func:`load_config` / :class:`Config` — the settings of ``configs/default.toml``, with
  the same precedence as the command line (arguments > ``TILESCAN_*`` > file > defaults).
- :func:`load_model` / :func:`describe_model` — a tilescan ``.keras`` model with its
  metadata (classes, input size, bands, ground-scale range); ``describe_model`` reads only
  the metadata and never imports Keras.
- :func:`explain_figures` — the study's figure (original, heatmap, overlay) for images or scene tiles.
- :data:`CAM_METHODS` / :func:`get_cam` — the batched CAM methods.
- Errors: :class:`TilescanError` and its subclasses; each carries its CLI ``exit_code``.

The library writes no output to the terminal: it reports through :mod:`logging` (logger
``tilescan``), silent unless the caller configures logging. Importing ``tilescan`` is cheap:
Keras, TensorFlow and rasterio load only when a function needs them.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Sequence

from .config import CAM_METHOD_NAMES as CAM_METHODS
from .config import KEYWORD_ALIASES as _ALIASES
from .config import Config, load_config
from .errors import (
    ConfigError,
    InputError,
    LockedError,
    ModelError,
    NoScenesError,
    OutputError,
    OutputExistsError,
    TilescanError,
)
from .log import emit, some

if TYPE_CHECKING:  # pragma: no cover
    from .model import LoadedModel
    from .pipeline.report import RunReport

__version__ = "0.2.0"

__all__ = [
    "CAM_METHODS",
    "Config",
    "ConfigError",
    "InputError",
    "LockedError",
    "ModelError",
    "NoScenesError",
    "OutputError",
    "OutputExistsError",
    "TilescanError",
    "collect",
    "cut_chips",
    "describe_model",
    "evaluate",
    "explain_figures",
    "get_cam",
    "load_config",
    "load_model",
    "parse_shard",
    "run",
    "runtime",
    "stop_runs",
    "train",
]

_RUN_SECTIONS = ("tiling", "inference", "cam", "output")


def _override_layer(overrides: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``tile_size=256`` / ``tiling__tile_size=256`` / ``cam="layercam"`` -> a config layer;
    a keyword set to None is left out (not given)."""
    from .config import SECTIONS

    layer: dict[str, dict[str, Any]] = {}
    for name, value in overrides.items():
        if "__" in name:
            section, key = name.split("__", 1)
        elif name in _ALIASES:
            section, key = _ALIASES[name]
        else:
            owners = [s for s in _RUN_SECTIONS if name in SECTIONS[s].__dataclass_fields__]
            if len(owners) != 1:
                raise ConfigError(f"unknown setting {name!r}: use a key of [{'], ['.join(_RUN_SECTIONS)}] "
                                  "(e.g. tile_size=256) or SECTION__KEY (e.g. tiling__stride=64)")
            section, key = owners[0], name
        if value is None and key in getattr(SECTIONS.get(section), "__dataclass_fields__", ()):
            continue  # not given, whatever ``config`` is (load_config drops it too); a wrong name is still said
        layer.setdefault(section, {})[key] = value
    return layer


def run(
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    out: str | os.PathLike,
    config: Config | str | os.PathLike | None = None,
    *,
    model: str | os.PathLike | LoadedModel | None = None,
    shard: tuple[int, int] = (0, 1),
    progress: bool = False,
    stac: Sequence[str] = (),
    assets: Sequence[str] | None = None,
    stac_items: bool = False,
    interrupt: str = "raise",
    **overrides: Any,
) -> RunReport:
    """Process scenes (GeoTIFF files, or folders searched for ``*.tif``) into ``out``.

    ``config``: a :class:`Config`, a TOML file, or None (defaults and ``TILESCAN_*``
    variables). ``overrides``: settings by key (``tile_size=256``, ``units="px"``,
    ``batch_size=64``, ``cam="layercam"``, ``target="Forest"``) or ``section__key``;
    they win over ``config``. ``model``: a tilescan ``.keras`` file (default: the packaged
    model), or what :func:`load_model` returned: run from its file (changes made to its ``.model``
    in memory are not used: save them as a model first). ``shard``: ``(i, n)`` to run share ``i`` of ``n``. ``inputs`` may also be URLs
    (``https://``, ``s3://``, ``gs://``, ``az://``) and STAC ``*.json`` documents; ``stac``:
    STAC documents by any name (one, or a list); ``assets``: the STAC asset key(s) or band
    names to read (a list, or comma-separated);
    ``stac_items``: also write ``out/<scene>/item.json``, a STAC Item of the outputs.

    Returns a :class:`~tilescan.pipeline.report.RunReport` (``.results``, ``.exit_code``,
    ``.to_dict()``; also written to ``out/report.json``). A scene that fails (unreadable, or a
    path that does not exist beside others that do) does not raise: it is listed in the
    report. Raises :class:`TilescanError` for what stops the whole run (no input gives a
    scene, a bad setting, an unusable model or output folder). Finished outputs of another
    config are replaced with ``overwrite=True`` (the CLI's ``--overwrite``).

    Ctrl-C (SIGINT, in the main thread) stops the run cleanly, as a scheduler's SIGTERM does
    (finished scenes kept, the rest left for a rerun to resume, ``report.json`` written),
    then raises :class:`KeyboardInterrupt`; a second Ctrl-C raises at once. SIGTERM returns
    the report, its ``exit_code`` 75. ``interrupt="report"`` returns the report for SIGINT too,
    and a second signal ends the process, as the ``tilescan`` command does.
    """
    from .pipeline.report import report_failed_start
    from .pipeline.run import run as _run

    out = _given(out)
    inputs = [_given(p, "an input") for p in _paths(inputs, "run takes scene files, folders or URLs")]
    if isinstance(stac, (str, os.PathLike)):
        stac = [stac]
    if isinstance(assets, str):  # "red,green,blue", as on the command line
        assets = _names(assets)
    try:  # settings that do not hold: OUT's report says so too, not an earlier run's outcome
        if isinstance(config, Config):
            cfg = config if not overrides else _replace_all(config, _override_layer(overrides))
        else:
            cfg = load_config(_toml(config), _override_layer(overrides))
        if interrupt not in ("raise", "report"):
            raise ConfigError(f"interrupt must be 'raise' or 'report', got {interrupt!r}")
    except TilescanError as exc:
        report_failed_start(out, shard, exc)
        raise
    return _run(list(inputs), out, cfg, model_path=_model_file(model),
                shard=shard, progress=progress, stac=stac, assets=assets, stac_items=stac_items,
                ctrl_c_raises=interrupt == "raise")


def stop_runs() -> None:
    """Ask every :func:`run` at work in this process to stop cleanly, as a scheduler's SIGTERM
    does (the scene in flight dropped, finished ones kept, ``report.json`` written; each run
    returns its report, ``exit_code`` 75, and a rerun resumes). For runs on worker threads (a
    web service, a thread pool), where signals do not reach them; callable from any thread."""
    from . import stop

    stop.request()


def _paths(inputs, takes: str) -> list:
    """``inputs`` as a list of paths: one path, or any iterable of them; anything else (an array
    of pixels, an open dataset) is refused with what the function takes."""
    if isinstance(inputs, (str, os.PathLike)):
        return [inputs]
    listed = list(inputs) if not hasattr(inputs, "shape") and hasattr(inputs, "__iter__") else None
    if listed is not None and all(isinstance(p, (str, os.PathLike)) for p in listed):  # a list, a glob's generator
        return listed
    pixels = hasattr(inputs, "shape") or any(hasattr(p, "shape") for p in listed or ())
    hint = "; for an array of pixels, use get_cam(name, load_model()) on it" if pixels else ""
    raise TypeError(f"{takes} (a path, or a list of them), got {type(inputs).__name__}{hint}")


def _toml(config):
    """A ``config`` argument that is not a Config: a TOML file's path or None, else refused."""
    if config is None or isinstance(config, (str, os.PathLike)):
        return config
    raise TypeError(f"a config is a Config, a TOML file's path or None, got {type(config).__name__} (settings "
                    "of your own: keywords, or load_config(overrides={'tiling': {...}}))")


def _given(path: str | os.PathLike, what: str = "out") -> str | os.PathLike:
    """``path`` when it names something: ``""`` (an unset variable) is refused, not the current folder."""
    if path is None:
        raise ConfigError(f"{what} is None: give a path")
    if not str(os.fspath(path)).strip():
        raise ConfigError(f"{what} is empty (an unset variable?): give a path")
    return path


def _replace_all(cfg: Config, layer: dict[str, dict[str, Any]]) -> Config:
    for section, values in layer.items():
        cfg = cfg.replace(section, **values)
    return cfg


def load_model(path: str | os.PathLike | None = None) -> LoadedModel:
    """Load a tilescan model (default: the packaged one): ``.model`` (Keras), ``.classes``,
    ``.input_size``, ``.scale_range``, ``.meta``. Imports Keras. The model takes (B, H, W, C)
    float pixels in 0..1 (uint8 / 255); its normalisation is inside it."""
    from .backend import import_keras
    from .model import load_model as _load

    import_keras()
    return _load(path)


def describe_model(path: str | os.PathLike | None = None) -> LoadedModel:
    """A model's metadata and sha256 without loading Keras (``.model`` is None)."""
    from .model import describe_model as _describe

    return _describe(path)


def explain_figures(inputs: str | os.PathLike | Sequence[str | os.PathLike], out: str | os.PathLike, *,
                    model: str | os.PathLike | LoadedModel | None = None, **kwargs: Any) -> list:
    """Explanation figures for images or GeoTIFF scene tiles; returns the PNG paths.
    Keyword arguments as :func:`tilescan.explain.figures.run_explain` (``methods``, or ``cam`` as
    :func:`run` and the command line call it: a list, or names comma-separated; ``layer``, ``target``, ``tiles``, ``top``,
    ``tile_size``, ``stride``, ``units``, ``nodata``, ``bands``, ``min_valid``); ``config`` and ``model`` as in
    :func:`run`: scene tiles are cut as run cuts them with the same settings."""
    from .backend import import_keras
    from .explain.figures import run_explain

    inputs = _paths(inputs, "explain_figures takes image or scene file paths")
    _cam_alias(kwargs, "methods")
    _only_keywords_of(run_explain, kwargs, "explain_figures", exclude=("inputs", "out_dir", "model_path"))
    if not isinstance(kwargs.get("config"), Config):
        kwargs["config"] = _toml(kwargs.get("config"))
    import_keras()
    if isinstance(kwargs.get("methods"), str):
        kwargs["methods"] = _names(kwargs["methods"])
    if model is not None:
        kwargs["model_path"] = _model_file(model)
    return run_explain([str(p) for p in inputs], str(_given(out)), **kwargs)


def _only_keywords_of(func, kwargs: dict, name: str, exclude: Sequence[str] = ()) -> None:
    """A TypeError naming the API function ``name`` for keywords ``func`` does not take."""
    import inspect

    known = set(inspect.signature(func).parameters) - set(exclude)
    if unknown := sorted(set(kwargs) - known):
        raise TypeError(f"{name}() got unexpected keyword arguments {', '.join(unknown)} "
                        f"(it takes {', '.join(sorted(known))})")


def _names(text: str) -> list[str]:
    """``"gradcam, layercam"`` -> ``["gradcam", "layercam"]``: names as the command line takes them."""
    return [n.strip() for n in text.split(",") if n.strip()]


def get_cam(name: str, model, layer: str | None = None, **kwargs: Any):
    """A batched CAM method (one of :data:`CAM_METHODS`) bound to a Keras model, or to the
    model of :func:`load_model` (then ``layer`` defaults to the one its metadata names).
    Called on a (B, H, W, C) batch of float pixels in 0..1 (integer, 0..255 or NaN ones are refused);
    ``target``: None (each image's prediction), class indexes, or, bound to a loaded model, a
    class name. Returns a ``CAMResult``: ``probs`` (the prediction is ``probs.argmax(-1)``),
    ``target`` (the class each map explains), and per image the map at the layer's own
    resolution (``raw``, and ``cam`` normalised to 0..1: 4 x 4 for the default layer of a
    128 px input): resize it to the image to overlay it, as ``run`` and ``explain_figures`` do."""
    from .explain.cam import get_cam as _get

    if not isinstance(name, str):  # get_cam(model, "gradcam"): the arguments the other way round
        raise TypeError(f"get_cam(name, model): the first argument is the method's name (one of "
                        f"{', '.join(CAM_METHODS)}), got {type(name).__name__}")
    classes = None
    if hasattr(model, "cam_layer") and hasattr(model, "model"):  # a LoadedModel: its layer, and targets by name
        layer, model, classes = layer or model.cam_layer, model.model, list(model.classes)
    cam = _get(name, model, layer=layer, **kwargs)
    cam.classes = classes
    return cam


def parse_shard(text: str | None = None, count: int | None = None) -> tuple[int, int]:
    """``"I/N"`` (0-based ``I``) as ``(I, N)``; without ``text``, the shard a Slurm array
    task or a Kubernetes Indexed Job gives this process, else ``(0, 1)``."""
    from .pipeline.units import parse_shard as _parse

    return _parse(text, count=count)


def train(data: str | os.PathLike, out: str | os.PathLike, config: Config | str | os.PathLike | None = None, *,
          splits: str | os.PathLike | None = None, name: str | None = None, resume: bool = False,
          overwrite: bool = False, max_seconds: float | None = None, limit: int | None = None, half: bool = False,
          verbose: int = 0, **overrides: Any) -> Any:
    """Train a ResNet-18 on ``data`` (a folder-per-class image dataset) into the model file
    ``out``; ``config``'s ``[train]`` section and ``overrides`` (``epochs=3``, ``init="default"``)
    set the recipe. ``splits``: a folder of split lists; ``name``: the dataset's name in the
    model's metadata. Imports Keras. Returns a dict: ``model`` (the file), ``sha256``,
    ``val_accuracy`` and ``val_loss`` of the saved float32 model on the val split (plain
    cross-entropy: the epochs' figures, in ``<model>.history.csv``, are the training precision's,
    with label smoothing), ``seconds``, and the training state (``best_epoch``, ``epochs_done``,
    ``stopped``...). Python's ``random`` and numpy's global generator are left as they were."""
    from .backend import callers_draws

    with callers_draws():
        return _train_api(data, out, config, splits, name, resume, overwrite, max_seconds, limit, half, verbose, overrides)


def _train_api(data, out, config, splits, name, resume, overwrite, max_seconds, limit, half, verbose, overrides):
    """:func:`train`'s work."""
    from .backend import import_keras
    from .training.data import load_dataset, twins
    from .training.resuming import checkpoint_split
    from .training.train import train as _train

    cfg, out = _train_config(config, overrides), _given(out)
    import_keras()
    drawn = {"val_fraction": cfg.val_fraction, "test_fraction": cfg.test_fraction, "seed": cfg.seed}
    ds = load_dataset(data, splits, **{**drawn, **(checkpoint_split(out) if resume else {})})  # resumed: its split
    if name:
        ds.name = name
    n_train, n_val = len(ds.items("train")), len(ds.items("val"))
    used = f"; --limit {limit}: {min(limit, n_train)} and {min(limit, n_val)} of them used" if limit else ""
    emit(f"{ds.name}: {len(ds.classes)} classes, train {n_train}, val {n_val} ({ds.split_source}{used})")
    in_val = {k for _, k in ds.items("val")}
    if bare := [c for i, c in enumerate(ds.classes) if i not in in_val]:
        emit(f"warning: no val image of {len(bare)} class(es) ({', '.join(bare[:5])}{'…' if len(bare) > 5 else ''}): "
             "early stopping and the val scores do not see them")
    if found := twins(ds):
        said = some([" = ".join(f"'{p}' ({s})" for s, p in g) for g in found], 3, "; ")
        emit(f"warning: {len(found)} image(s) have a twin with the same bytes in another class or split: {said}"
             " (a twin in two classes teaches both labels; "
             "one in the test split is scored as unseen though trained on: remove one of each pair)")
    if limit and limit < len(ds.classes):
        emit(f"warning: --limit {limit} is below the {len(ds.classes)} classes: {len(ds.classes) - limit} of them get no image")
    return _train(ds, out, cfg, resume=resume, overwrite=overwrite, max_seconds=max_seconds, limit=limit, half=half,
                  verbose=verbose)


def _train_config(config, overrides: dict[str, Any]):
    if isinstance(config, Config):
        return config.train if not overrides else config.replace("train", **overrides).train
    return load_config(_toml(config), {"train": overrides} if overrides else None).train


def evaluate(model: str | os.PathLike | LoadedModel | None, data: str | os.PathLike, out: str | os.PathLike, split: str = "test",
             **kwargs: Any) -> dict:
    """Score ``model`` (None or ``"default"``: the packaged one) on ``split`` of ``data``, writing
    report.json, CSVs and figures to ``out``; keyword arguments as
    :func:`tilescan.training.evaluate.run_evaluate` (``batch_size``, ``tta``, ``explanations``,
    ``cam_methods`` or ``cam`` (a list, or comma-separated), ``record``, ``limit``, ...). Imports Keras."""
    from .backend import import_keras
    from .training.evaluate import run_evaluate

    _cam_alias(kwargs, "cam_methods")
    _only_keywords_of(run_evaluate, kwargs, "evaluate", exclude=("model_path", "data", "split", "out_dir"))
    import_keras()
    if isinstance(kwargs.get("cam_methods"), str):
        kwargs["cam_methods"] = _names(kwargs["cam_methods"])
    return run_evaluate(_model_file(model), str(data), split, str(_given(out)), **kwargs)


def collect(out: str | os.PathLike, gpkg: bool = True, styles: bool = True) -> dict:
    """Join the finished units of a run folder ``out`` into ``out/collected/`` (one GeoParquet
    table, a GeoPackage copy, per-class summary, QGIS project); returns the summary."""
    from .outputs.collect import run_collect

    return run_collect(_given(out), gpkg=gpkg, styles=styles)


def cut_chips(scenes: str | os.PathLike | Sequence[str | os.PathLike], labels: str | os.PathLike, out: str | os.PathLike,
              config: Config | str | os.PathLike | None = None, *, class_field: str | None = None,
              layer: str | None = None, model: str | os.PathLike | LoadedModel | None = None, overwrite: bool = False,
              **options: Any) -> Any:
    """Cut the tiles of ``scenes`` that ``labels`` (polygons or points in any GDAL vector
    format) label into a folder-per-class dataset at ``out``, tiled as ``run`` would tile them
    (``config``'s ``[tiling]``); ``options`` as :class:`tilescan.training.chips.ChipOptions`
    (``min_cover``, ``min_valid``, ``split``, ``block_m``, ``val_fraction``, ``test_fraction``,
    ``seed``)."""
    from .training.chips import ChipOptions
    from .training.chips import cut_chips as _cut

    cfg = config if isinstance(config, Config) else load_config(_toml(config))
    scenes = [_given(p, "a scene") for p in _paths(scenes, "cut_chips takes scene files or folders")]
    return _cut([str(s) for s in scenes], labels, _given(out), cfg.tiling, class_field=class_field, layer=layer,
                model_path=_model_file(model), opts=ChipOptions(**options), overwrite=overwrite)


def runtime(config: Config | str | os.PathLike | None = None) -> dict:
    """Where a run would compute: the Keras backend and device, the GPUs the machine shows, a
    warning when one goes unused, and what ``[inference] precision`` and ``pipeline`` resolve
    to with ``config``, how many model steps run at once (``model_streams``) and how many
    threads read with the overlap pipeline (``reader_threads``), whether they read in helper
    processes (``reader_processes``), and the GIL's switch interval during the stream
    (``switch_interval_ms``). Imports Keras."""
    from .backend import describe_device, import_keras
    from .explain.shims import model_on_accelerator
    from .pipeline.engine import (resolve_pipeline, resolve_precision, resolve_readers, resolve_streams,
                                  resolve_switch_interval, switch_ms_used)

    cfg = config if isinstance(config, Config) else load_config(_toml(config))
    keras = import_keras()
    dev = describe_device(keras)
    backend = dev["backend"]
    inf = cfg.inference
    overlap = resolve_pipeline(inf.pipeline, backend) == "overlap"  # readers only there (run.json: null in lockstep)
    return {**dev,
            "precision": {"setting": inf.precision, "used": resolve_precision(inf.precision, backend),
                          "auto": resolve_precision("auto", backend)},
            "pipeline": {"setting": inf.pipeline, "used": resolve_pipeline(inf.pipeline, backend)},
            "model_streams": {"setting": inf.model_streams, "used": resolve_streams(inf.model_streams, backend)},
            "reader_threads": {"setting": inf.reader_threads,
                               "used": resolve_readers(inf.reader_threads, backend) if overlap else None},
            "reader_processes": {"setting": inf.reader_processes, "used": inf.reader_processes and overlap},
            "switch_interval_ms": {"setting": inf.switch_interval_ms,
                                   "used": switch_ms_used(resolve_switch_interval(inf.switch_interval_ms,
                                                                                  model_on_accelerator(backend)))}}


def _model_file(model) -> str | None:
    """A ``model`` argument as the functions above take it: a path, ``"default"``, or what
    :func:`load_model` returns (its file); None for the packaged model."""
    from .model import model_path

    return None if model is None else model_path(model)


def _cam_alias(kwargs: dict, name: str) -> None:
    """``cam=``, as :func:`run` and every command's ``--cam`` spell it, for the keyword ``name``."""
    if "cam" in kwargs:
        if name in kwargs:
            raise ConfigError(f"give the CAM methods once: cam= or {name}=, not both")
        kwargs[name] = kwargs.pop("cam")
