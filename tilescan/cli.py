"""The ``tilescan`` command line: a thin click layer over the library.

Heavy imports (Keras, TensorFlow, rasterio) happen inside the commands, so
``tilescan --help`` answers at once. Every deliberate error is a
:class:`~tilescan.errors.TilescanError`: its message (naming the file) goes to stderr
and its exit code is returned. See ``tilescan.errors`` for the codes.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable

import click

from . import __version__
from .errors import EXIT_INTERNAL, EXIT_USAGE, TilescanError


class _Ctx:
    def __init__(self, verbosity: int):
        self.verbosity = verbosity

    def log(self, msg: str) -> None:
        if self.verbosity >= 0 or msg.startswith(("error", "warning")):
            click.echo(msg, err=True)

    def debug(self, msg: str) -> None:
        if self.verbosity > 0:
            click.echo(msg, err=True)


def _quiet_backend(verbosity: int) -> None:
    """Import Keras now, its start-up chatter kept off the terminal unless -v is given."""
    from .backend import import_keras

    import_keras(verbosity)


def _guard(fn: Callable[[], Any]) -> None:
    """Run a command body; map errors to messages and exit codes."""
    try:
        code = fn()
    except TilescanError as exc:
        click.echo(f"tilescan: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("tilescan: interrupted", err=True)
        sys.exit(130)
    except click.exceptions.Exit:
        raise
    except click.ClickException:
        raise
    except Exception as exc:  # pragma: no cover - a bug
        import traceback

        traceback.print_exc()
        click.echo(f"tilescan: internal error {type(exc).__name__}: {exc} (please report this)", err=True)
        sys.exit(EXIT_INTERNAL)
    sys.exit(code or 0)


def _bands(value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        return [int(v) for v in value.replace(",", " ").split()]
    except ValueError:
        raise click.BadParameter(f"expected 1-based band numbers like 3,2,1, got {value!r}", param_hint="'--bands'") from None


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="tilescan")
@click.option("-v", "--verbose", count=True, help="More output (repeatable).")
@click.option("-q", "--quiet", count=True, help="Less output: errors and warnings only.")
@click.pass_context
def main(ctx: click.Context, verbose: int, quiet: int) -> None:
    """Classify every tile of GeoTIFF scenes with a ResNet-18, explain each label with a
    batched Grad-CAM, and write GeoParquet + Cloud-Optimized GeoTIFF outputs.

    \b
    Exit codes: 0 ok · 1 internal error · 2 usage/config error · 3 some scenes failed
    · 4 every scene failed / none found · 5 model error · 6 output error.
    """
    ctx.obj = _Ctx(verbose - quiet)


# ----------------------------------------------------------------------------- run


@main.command()
@click.argument("inputs", nargs=-1, required=True, metavar="INPUT...")
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--model", "model_path", envvar="TILESCAN_MODEL", type=click.Path(dir_okay=False), help="A tilescan .keras model (default: the packaged AID model).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="TOML config file (see configs/default.toml).")
@click.option("--tile-size", type=click.IntRange(min=1), help="Tile edge in scene pixels.")
@click.option("--stride", type=click.IntRange(min=0), help="Step between tiles (< tile size: overlapping tiles).")
@click.option("--units", type=click.Choice(["auto", "px", "m"]), help="Unit of --tile-size/--stride. auto: scene pixels where that puts the model at its ground scale, else metres at the nearest edge of its range; px or m force one.")
@click.option("--batch-size", type=click.IntRange(min=1), help="Tiles per model batch.")
@click.option("--bands", help="1-based bands in the model's order, e.g. 3,2,1 for B,G,R files.")
@click.option("--min-valid", type=click.FloatRange(0, 1), help="Skip tiles with less valid area than this fraction.")
@click.option("--cam", "cam_method", help="CAM method: gradcam, gradcam++, hirescam, xgradcam, layercam, eigencam, scorecam.")
@click.option("--cam-layer", help="Layer to explain (default: the model's last conv block).")
@click.option("--target", "target_class", help="Explain this class (name or index) instead of each tile's prediction.")
@click.option("--heatmap-scale", type=click.FloatRange(0, 1, min_open=True), help="Heatmap resolution as a fraction of the scene's.")
@click.option("--gpkg/--no-gpkg", default=None, help="Also write tiles.gpkg for GIS installs without Parquet.")
@click.option("--allow-pixel-space", is_flag=True, default=None, help="Process scenes without georeferencing, in pixel coordinates.")
@click.option("--threads", "reader_threads", type=click.IntRange(min=1), help="Reader threads.")
@click.option("--shard", help="Run share I/N of the work (0-based). Default: from Slurm array / Kubernetes indexed-job variables.")
@click.option("--shard-count", type=click.IntRange(min=1), help="Shard count for Kubernetes (JOB_COMPLETION_INDEX gives only the index).")
@click.option("--overwrite", is_flag=True, default=None, help="Replace finished outputs (never done without it).")
@click.option("--progress/--no-progress", default=None, help="Progress bar per scene (default: on a terminal).")
@click.pass_obj
def run(obj: _Ctx, inputs, out, model_path, config_path, tile_size, stride, units, batch_size, bands, min_valid, cam_method, cam_layer,
        target_class, heatmap_scale, gpkg, allow_pixel_space, reader_threads, shard, shard_count, overwrite, progress) -> None:
    """Tile, classify and explain each GeoTIFF in INPUT (files or folders searched for
    .tif/.tiff), writing OUT/<scene>/{tiles.parquet, labels.tif, heatmap.tif, quicklook.png,
    run.json} and OUT/report.json. Rerunning skips finished scenes."""

    def body():
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2" if obj.verbosity <= 0 else "0")  # Keras is imported only if a scene needs the model
        from .config import load_config
        from .job import parse_shard
        from .job import run as run_job

        flags = {
            "tiling": {"tile_size": tile_size, "stride": stride, "units": units, "bands": _bands(bands), "min_valid_fraction": min_valid, "allow_pixel_space": allow_pixel_space},
            "inference": {"batch_size": batch_size, "reader_threads": reader_threads},
            "cam": {"method": cam_method, "layer": cam_layer, "target_class": target_class},
            "output": {"heatmap_scale": heatmap_scale, "gpkg": gpkg, "overwrite": overwrite},
        }
        cfg = load_config(config_path, flags)
        sh = parse_shard(shard, count=shard_count)
        show = sys.stderr.isatty() if progress is None else progress
        report = run_job(inputs, out, cfg, model_path=model_path, shard=sh, progress=show and obj.verbosity >= 0, log=obj.log)
        c = report.to_dict()["counts"]
        obj.log(f"done: {c['done']} written, {c['skipped']} already complete, {c['failed']} failed -> {out}")
        return report.exit_code

    _guard(body)


# ----------------------------------------------------------------------------- train


@main.command()
@click.argument("data", type=click.Path())
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False), help="Model file to write (.keras).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="TOML config with a [train] section (e.g. configs/aid-resnet18.toml).")
@click.option("--splits", "splits_dir", type=click.Path(file_okay=False), help="Folder with train.txt / val.txt split lists (default: DATA/splits if present, else a seeded stratified split).")
@click.option("--epochs", type=click.IntRange(min=1))
@click.option("--batch-size", type=click.IntRange(min=1))
@click.option("--image-size", type=click.IntRange(min=32))
@click.option("--lr", "learning_rate", type=float)
@click.option("--patience", type=click.IntRange(min=0), help="Early-stopping patience in epochs (0 = off).")
@click.option("--resume", is_flag=True, help="Continue a killed run from its last checkpoint (OUT.ckpt/).")
@click.option("--overwrite", is_flag=True, help="Replace an existing model file.")
@click.option("--limit", type=click.IntRange(min=1), help="Use at most N images per split (smoke tests).")
@click.option("--max-time", type=float, help="Stop after the epoch that crosses this many seconds.")
@click.option("--half", is_flag=True, help="Store weights as float16 (half the file size).")
@click.option("--dataset-name", help="Name recorded in the model metadata (default: the folder name).")
@click.pass_obj
def train(obj: _Ctx, data, out, config_path, splits_dir, epochs, batch_size, image_size, learning_rate, patience, resume, overwrite, limit, max_time, half, dataset_name) -> None:
    """Train a ResNet-18 on DATA, a folder-per-class image dataset (AID layout, plain class
    folders, or Train/ Val/ Test/ folders). Only the train and val splits are read."""

    def body():
        _quiet_backend(obj.verbosity)
        from .config import load_config
        from .data import load_dataset
        from .train import train as train_model

        flags = {"train": {"epochs": epochs, "batch_size": batch_size, "image_size": image_size, "learning_rate": learning_rate, "patience": patience}}
        cfg = load_config(config_path, flags).train
        ds = load_dataset(data, splits_dir, cfg.val_fraction, cfg.test_fraction, cfg.seed)
        if dataset_name:
            ds.name = dataset_name
        obj.log(f"{ds.name}: {len(ds.classes)} classes, train {len(ds.items('train'))}, val {len(ds.items('val'))} ({ds.split_source})")
        verbose = 1 if sys.stdout.isatty() and obj.verbosity >= 0 else (2 if obj.verbosity > 0 else 0)
        train_model(ds, out, cfg, resume=resume, overwrite=overwrite, max_seconds=max_time, limit=limit, half=half, verbose=verbose, log=obj.log)
        return 0

    _guard(body)


# ----------------------------------------------------------------------------- evaluate


@main.command()
@click.argument("model_path", metavar="MODEL")
@click.argument("data", type=click.Path())
@click.option("--split", default="test", show_default=True, type=click.Choice(["train", "val", "test"]))
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="Folder for report.json, CSVs and PNGs.")
@click.option("--splits", "splits_dir", type=click.Path(file_okay=False), help="Folder with split lists.")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--tta", is_flag=True, help="Average over the 8 flips/rotations.")
@click.option("--explain-samples", default=8, show_default=True, type=click.IntRange(min=0), help="Images in explanations.png.")
@click.option("--explanations", is_flag=True, help="Also score CAM faithfulness (deletion/insertion AUC) and cost per method.")
@click.option("--cam-methods", default="gradcam", show_default=True, help="Comma-separated CAM methods for --explanations.")
@click.option("--faithfulness-images", type=click.IntRange(min=1), help="With --explanations: score a seeded sample of N images (default: the whole split).")
@click.option("--record", is_flag=True, help="Store the scores in the model file's metadata.")
@click.option("--limit", type=click.IntRange(min=1), help="Use at most N images.")
@click.pass_obj
def evaluate(obj: _Ctx, model_path, data, split, out, splits_dir, batch_size, tta, explain_samples, explanations, cam_methods, faithfulness_images, record, limit) -> None:
    """Score MODEL (a .keras file, or 'default' for the packaged model) on a split of DATA:
    accuracy, per-class precision/recall/F1, confusion matrix, explanation figure."""

    def body():
        _quiet_backend(obj.verbosity)
        from .evaluate import run_evaluate

        methods = [m.strip() for m in cam_methods.split(",") if m.strip()]
        run_evaluate(None if model_path == "default" else model_path, data, split, out, splits_dir=splits_dir, batch_size=batch_size, tta=tta,
                     explain_samples=explain_samples, explanations=explanations, cam_methods=methods, record=record, limit=limit,
                     faithfulness_limit=faithfulness_images, log=obj.log)
        return 0

    _guard(body)


# ----------------------------------------------------------------------------- explain


def _tiles(value: str | None) -> list[tuple[int, int]]:
    if not value:
        return []
    out = []
    for part in value.replace(";", " ").split():
        try:
            r, c = part.split(",")
            out.append((int(r), int(c)))
        except ValueError:
            raise click.BadParameter(f"tiles are ROW,COL pairs separated by spaces or ';', got {part!r}") from None
    return out


@main.command()
@click.argument("inputs", nargs=-1, required=True, metavar="IMAGE_OR_SCENE...")
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False))
@click.option("--model", "model_path", envvar="TILESCAN_MODEL", type=click.Path(dir_okay=False))
@click.option("--cam", "methods", default="gradcam", show_default=True, help="One or more CAM methods, comma-separated.")
@click.option("--layer", help="Layer to explain (default: last conv block).")
@click.option("--target", help="Explain this class (name or index) instead of the prediction.")
@click.option("--tiles", help="Scene tiles as ROW,COL pairs, e.g. '0,1;2,3'.")
@click.option("--top", default=4, show_default=True, type=click.IntRange(min=1), help="Without --tiles: the N most confident tiles.")
@click.option("--tile-size", type=click.IntRange(min=1))
@click.pass_obj
def explain(obj: _Ctx, inputs, out, model_path, methods, layer, target, tiles, top, tile_size) -> None:
    """The study's figure: original | heatmap | overlay with label and confidence, for
    images or for tiles of a scene, for one or several CAM methods side by side."""

    def body():
        _quiet_backend(obj.verbosity)
        from .explain import run_explain

        paths = run_explain(list(inputs), out, model_path=model_path, methods=[m.strip() for m in methods.split(",") if m.strip()],
                            layer=layer, target=target, tiles=_tiles(tiles), top=top, tile_size=tile_size, log=obj.log)
        for p in paths:
            click.echo(str(p))
        return 0

    _guard(body)


# ----------------------------------------------------------------------------- collect


@main.command()
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--gpkg/--no-gpkg", default=True, show_default=True, help="Also write a GeoPackage copy.")
@click.pass_obj
def collect(obj: _Ctx, out, gpkg) -> None:
    """Join the per-scene and per-shard tables of OUT into one GeoParquet dataset
    (OUT/collected/), a GeoPackage copy, and a per-class summary."""

    def body():
        from .collect import run_collect

        run_collect(out, gpkg=gpkg, log=obj.log)
        return 0

    _guard(body)


# ----------------------------------------------------------------------------- info


@main.command()
@click.argument("model_path", required=False, metavar="[MODEL]")
@click.pass_obj
def info(obj: _Ctx, model_path) -> None:
    """Show a model's metadata (default: the packaged model) without loading Keras."""

    def body():
        import json

        from .model import PACKAGE_MODEL, read_metadata

        meta = read_metadata(model_path or PACKAGE_MODEL)
        click.echo(json.dumps(meta, indent=2))
        return 0

    _guard(body)


if __name__ == "__main__":  # pragma: no cover
    main()
