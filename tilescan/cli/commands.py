"""The `tilescan` commands: thin click wrappers over the public API (``import tilescan``).
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Sequence

import click

import tilescan

from .. import faults, stop
from ..errors import EXIT_PARTIAL
from ..log import some

from .options import (
    OutPath,
    _CAM_HELP,
    _LAYERS_EPILOG,
    _VERBOSITY_NOTE,
    _Bands,
    _CamMethods,
    _config_flags,
    _Ctx,
    _guard,
    _old_spelling,
    _quiet_backend,
    _typed_flags,
    _verbosity,
    config_option,
    option,
    env_near_misses,
    say,
    unconfigure_logging,
    work_done,
)


def _load_config(obj: _Ctx, path, flags, typed):
    """The settings (:func:`tilescan.load_config`), after a warning per variable that looks like one misspelt."""
    for said in env_near_misses(os.environ):
        obj.log(f"warning: {said}")
    return tilescan.load_config(path, flags, flags=typed)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100, "show_default": True})
@click.version_option(tilescan.__version__, prog_name="tilescan")
@click.option("-v", "--verbose", count=True, show_default=False, help=f"More output; repeatable ({_VERBOSITY_NOTE}).")
@click.option("-q", "--quiet", count=True, show_default=False, help=f"Less output: errors and warnings only ({_VERBOSITY_NOTE}).")
@click.pass_context
def main(ctx: click.Context, verbose: int, quiet: int) -> None:
    """Classify every tile of GeoTIFF scenes with a ResNet-18, explain each label with a
    batched Grad-CAM, and write GeoParquet + Cloud-Optimized GeoTIFF outputs.

    \b
    Exit codes: 0 ok · 1 internal error · 2 usage/config error · 3 some scenes failed
    · 4 every scene failed / none found · 5 model error · 6 output error
    · 75 stopped by SIGTERM/SIGINT (rerun to resume).
    """
    ctx.obj = _Ctx(verbose - quiet)
    ctx.call_on_close(unconfigure_logging)


# ----------------------------------------------------------------------------- run


def _arg_value(args: Sequence[str], *names: str) -> str | None:
    """The value last given to one of the options ``names`` in raw ``args`` (``-o X``, ``-oX``,
    ``--out X``, ``--out=X``); None if none."""
    found = None
    for i, a in enumerate(args):
        if a in names and i + 1 < len(args):
            found = args[i + 1]
        for n in names:
            long = n.startswith("--")
            if (long and a.startswith(n + "=")) or (not long and a.startswith(n) and a != n and not a.startswith("--")):
                found = a[len(n) + long:]
    return found


class _RunCommand(click.Command):
    """``run``, whose options the parser refuses (exit 2) also replace OUT's report with the
    error, as a setting tilescan refuses itself does: a monitor never reads an earlier run's
    report as this one's."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        raw = list(args)
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:
            _report_refused(_arg_value(raw, "-o", "--out"), _arg_value(raw, "--shard"), exc)
            raise


def _report_refused(out: str | None, shard: str | None, exc: click.UsageError) -> None:
    """OUT's report (of the ``--shard`` given) says the run was refused: ``exc``'s message, exit 2."""
    if out:
        from ..pipeline.report import report_failed_start

        try:
            sh = tilescan.parse_shard(shard)
        except tilescan.TilescanError:
            sh = (0, 1)
        report_failed_start(out, sh, tilescan.ConfigError(exc.format_message()))


def _utf16(text: str) -> bool:
    """Whether a list read as UTF-8 is UTF-16: its byte-order mark (as undecodable bytes), a NUL
    at every other place of its start (Latin text without the mark), or a NUL beside a line end
    (a name of find -print0 does not end with a newline)."""
    head = text[:64]
    return head[:2] in ("\udcff\udcfe", "\udcfe\udcff") or "\n\0" in text or "\0\n" in text or any(
        len(h := head[k::2]) > 2 and set(h) == {"\0"} for k in (0, 1))


def _run_inputs(ctx: click.Context, inputs: tuple, scenes_from, stac) -> tuple:
    """The INPUTs given and those ``--scenes-from`` lists (blank lines apart, each line one as it
    stands; or NUL-separated, as ``find -print0`` writes them), refused when there are none or
    one is empty."""
    if scenes_from is not None:
        text = scenes_from.read()
        if _utf16(text):
            raise click.BadParameter(f"{scenes_from.name} is not a list of UTF-8 text lines (UTF-16?): save it as "
                                     "UTF-8", param_hint="--scenes-from")
        listed = text.split("\0" if "\0" in text else "\n")  # read in text mode: \r\n and \r are \n
        inputs = (*inputs, *(x for x in listed if x.strip()))
        if not any(x.strip() for x in listed):
            raise click.BadParameter(f"{scenes_from.name} lists no scene", param_hint="--scenes-from")
    if not inputs and not stac:
        raise click.UsageError("give at least one INPUT (a file, folder or URL) or --stac", ctx)
    if any(not str(i).strip() for i in inputs):
        raise click.UsageError("an INPUT is empty (an unset variable in a script?): give a file, folder or URL", ctx)
    return inputs


@main.command(cls=_RunCommand, epilog=_LAYERS_EPILOG)
@click.argument("inputs", nargs=-1, metavar="INPUT...")
@click.option("-o", "--out", required=True, type=OutPath(), help="Output folder.")
@option("--model", "model_path", envvar="TILESCAN_MODEL", show_envvar=True, type=click.Path(dir_okay=False),
        show_default="the packaged AID model", help="A tilescan .keras model.")
@config_option("TOML config file (see configs/default.toml).")
@click.option("--stac", "stac", multiple=True, metavar="URL_OR_FILE",
              help="A STAC Item, ItemCollection, Catalog or Collection (file or URL; repeatable): each item is a scene.")
@option("--asset", "asset", show_default="'visual' if the items have it, else the red, green, blue bands",
        help="STAC asset(s) to read: a key (visual), or keys or common band names in the model's order (red,green,blue).")
@click.option("--stac-items", is_flag=True, help="Also write OUT/<scene>/item.json: a STAC Item describing the outputs.")
@click.option("--scenes-from", "scenes_from", type=click.File("r", encoding="utf-8-sig", errors="surrogateescape"),
              metavar="FILE", help="Also each INPUT listed in FILE, one a line (or NUL-separated: find -print0), relative "
                                   "paths from the current folder (- : standard input): more scenes than a command line "
                                   "holds, in one run.")
@option("--tile-size", config_key=("tiling", "tile_size"), type=click.IntRange(min=1), help="Tile edge (scene pixels; metres with --units m).")
@option("--stride", config_key=("tiling", "stride"), type=click.IntRange(min=0),
        help="Step between tiles; 0 = the tile size, smaller = overlapping tiles.")
@option("--units", config_key=("tiling", "units"), type=click.Choice(["auto", "px", "m"], case_sensitive=False),
        help="Unit of --tile-size/--stride. auto: scene pixels where the scene's pixel size is inside the "
             "model's ground-scale range, else (a finer scene) metres at the range's fine edge; px or m force one.")
@option("--batch-size", config_key=("inference", "batch_size"), type=click.IntRange(min=1), help="Tiles per model batch.")
@option("--bands", config_key=("tiling", "bands"), type=_Bands(), show_default="auto: the model's scene_bands, else the RGB bands by colour, else the first ones",
        help="1-based scene bands in the model's order, e.g. 3,2,1 for B,G,R files.")
@option("--min-valid", config_key=("tiling", "min_valid_fraction"), type=click.FloatRange(0, 1),
        help="Skip tiles with less valid area than this fraction.")
@option("--nodata", config_key=("tiling", "nodata"), metavar="VALUE|none|file",
        help="The scenes' nodata value: a number replaces each file's own on every band (e.g. 0 for a fill "
             "border the file does not declare); none ignores the files' nodata; file keeps it.")
@option("--cam", "cam_method", config_key=("cam", "method"), type=click.Choice(tilescan.CAM_METHODS, case_sensitive=False),
        metavar="METHOD", help=f"CAM method: {_CAM_HELP}.")
@option("--cam-layer", config_key=("cam", "layer"), show_default="the model's last conv block", help="Layer to explain.")
@option("--target", "target_class", config_key=("cam", "target_class"), show_default="each tile's prediction",
        help="Explain this class (name or index).")
@option("--heatmap-scale", config_key=("output", "heatmap_scale"), type=click.FloatRange(0, 1, min_open=True),
        help="Heatmap resolution as a fraction of the scene's.")
@option("--gpkg/--no-gpkg", config_key=("output", "gpkg"),
        help="Also write tiles.gpkg (GeoPackage 1.2: every QGIS and GDAL reads it; GeoParquet needs GDAL >= 3.8).")
@option("--styles/--no-styles", config_key=("output", "styles"),
        help="Write QGIS styles (.qml) beside the outputs and a QGIS project <scene>.qgs.")
@option("--quicklook/--no-quicklook", config_key=("output", "quicklook"),
        help="Write quicklook.png (the scene, its labels and the heat side by side).")
@option("--allow-pixel-space/--no-allow-pixel-space", config_key=("tiling", "allow_pixel_space"),
        help="Process scenes without georeferencing, in pixel coordinates.")
@option("--threads", "reader_threads", config_key=("inference", "reader_threads"), metavar="N|auto",
        help="Reader threads with [inference] pipeline = \"overlap\" (auto: one per core when the model runs on a GPU, "
             "1 on the CPU).")
@option("--reader-processes/--reader-threads-only", "reader_processes", config_key=("inference", "reader_processes"),
        help="With [inference] pipeline = \"overlap\": each reader decodes and scales in a helper process of its own "
             "(local files), off the run's GIL (GPU hosts).")
@option("--output-workers", "output_workers", config_key=("inference", "output_workers"), type=click.IntRange(min=0),
        help="Helper processes for the GeoParquet, GeoPackage, label COG, quicklook and QGIS files (0: the "
             "run's threads; GPU hosts with many small scenes).")
@option("--shard", show_default="from Slurm array / Kubernetes indexed-job variables, else all",
        help="Run share I/N of the work (0-based I).")
@option("--shard-count", type=click.IntRange(min=1), show_default="from TILESCAN_SHARD_COUNT",
        help="Shard count for Kubernetes (JOB_COMPLETION_INDEX gives only the index).")
@option("--overwrite/--no-overwrite", config_key=("output", "overwrite"),
        help="Replace tilescan's earlier outputs (never done without it; a folder of something else never).")
@option("--update/--no-update", config_key=("output", "update"),
        help="Redo only the scenes whose outputs were made from another version of the scene file, other settings, "
             "another model or a tilescan that computes them otherwise (refused without it); skip the finished ones "
             "that match, as always.")
@option("--progress/--no-progress", default=None, show_default="on a terminal", help="A progress bar of the tiles classified (its total grows as scenes open).")
@_verbosity
@click.pass_context
def run(ctx: click.Context, inputs, out, model_path, config_path, stac, asset, stac_items, scenes_from, shard, shard_count,
        progress, **_config) -> None:
    """Tile, classify and explain each GeoTIFF in INPUT (files or folders searched for
    .tif/.tiff; https://, s3://, gs://, az:// URLs of scenes or of folders ending in /;
    STAC *.json documents), writing OUT/<scene>/{tiles.parquet, tiles.gpkg, labels.tif,
    heatmap.tif, quicklook.png, *.qml, <scene>.qgs, run.json} and OUT/report.json.
    Rerunning skips finished scenes."""
    obj: _Ctx = ctx.obj
    try:
        inputs = _run_inputs(ctx, inputs, scenes_from, stac)
    except click.UsageError as exc:  # as the parser's refusals: OUT's report says so
        _report_refused(str(out), shard, exc)
        raise

    def body():
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2" if obj.verbosity <= 0 else "0")  # Keras is imported only if a scene needs the model
        flags, typed = _config_flags(ctx)
        sh = (0, 1)
        try:  # settings that do not hold: OUT's report says so too, not an earlier run's outcome
            sh = tilescan.parse_shard(shard, count=shard_count)
            if shard is None and sh[1] > 1:  # taken from the scheduler: said, with the way out
                var = "SLURM_ARRAY_TASK_ID" if "SLURM_ARRAY_TASK_ID" in os.environ else "JOB_COMPLETION_INDEX"
                obj.log(f"shard {sh[0]}/{sh[1]} from {var}: this task does its share of the scenes given, as the "
                        "array's other tasks do theirs; where each task is given scenes of its own, pass --shard 0/1")
            cfg = _load_config(obj, config_path, flags, typed)
            importlib.import_module("tilescan.pipeline.run")  # a moment's import, in which a stop is reported too
            faults.point("start")
        except (tilescan.TilescanError, stop.Interrupted, KeyboardInterrupt) as exc:  # a stop in the first moments too
            from ..pipeline.report import report_failed_start

            report_failed_start(out, sh, exc)
            raise
        show = sys.stderr.isatty() if progress is None else progress
        assets = [a.strip() for a in asset.split(",") if a.strip()] if asset is not None else None
        if asset is not None and not assets:
            raise click.BadParameter("give asset keys, e.g. visual or red,green,blue", param_hint="--asset")
        if assets and not stac and not any(str(i).lower().endswith(".json") for i in inputs):
            obj.log("warning: --asset picks assets of STAC items, and no STAC document is among the inputs: ignored")
        report = tilescan.run(list(inputs), out, cfg, model=model_path, shard=sh, progress=show and obj.verbosity >= 0,
                              stac=stac, assets=assets, stac_items=stac_items, interrupt="report")
        work_done()
        if report.interrupted:
            i = report.interrupted
            obj.log(f"stopped by {i['signal']}" + (f" during {i['unit']}" if i.get("unit") else "")
                    + f"; {len(i['not_started'])} unit(s) not started; rerun the same command to resume")
        c = report.to_dict()["counts"]
        failed = [r.scene for r in report.failed]  # named again at the end of a long log (report.json has why)
        named = f" ({some(failed)})" if failed else ""
        obj.log(f"done: {c['done']} written, {c['skipped']} already complete, {c['failed']} failed{named} -> {out}")
        return report.exit_code

    _guard(body)


# ----------------------------------------------------------------------------- chips


@main.command(epilog=_LAYERS_EPILOG)
@click.argument("inputs", nargs=-1, required=True, metavar="SCENES...")
@click.option("--labels", "labels_path", required=True, type=click.Path(),
              help="Vector file of labelled polygons and/or points (GeoPackage, GeoJSON, Shapefile, GeoParquet, ...).")
@click.option("-o", "--out", required=True, type=OutPath(), help="Dataset folder to write.")
@option("--class-field", show_default="class, else label", help="Field of the labels that holds the class.")
@option("--layer", show_default="the first", help="Layer of a labels file with several.")
@option("--model", "model_path", envvar="TILESCAN_MODEL", show_envvar=True, type=click.Path(dir_okay=False),
        show_default="the packaged AID model", help="The model the chips are cut for (its input size, bands and scale): the parent for train --init.")
@config_option("TOML config file; its [tiling] section applies, as in run.")
@option("--tile-size", config_key=("tiling", "tile_size"), type=click.IntRange(min=1), help="Tile edge (scene pixels; metres with --units m), as in run.")
@option("--stride", config_key=("tiling", "stride"), type=click.IntRange(min=0), help="Step between tiles; 0 = the tile size.")
@option("--units", config_key=("tiling", "units"), type=click.Choice(["auto", "px", "m"], case_sensitive=False), help="Unit of --tile-size/--stride, as in run.")
@option("--bands", config_key=("tiling", "bands"), type=_Bands(), show_default="auto: the model's scene_bands, else the RGB bands by colour, else the first ones",
        help="1-based scene bands in the model's order.")
@option("--nodata", config_key=("tiling", "nodata"), metavar="VALUE|none|file",
        help="The scenes' nodata value, as in run: a number in place of each file's own, none, or file.")
@click.option("--min-cover", default=0.9, type=click.FloatRange(0, 1, min_open=True),
              help="Share of a tile one class's polygons must cover for the tile to become a chip.")
@click.option("--min-valid", default=0.95, type=click.FloatRange(0, 1, min_open=True),
              help="Share of a tile that must be valid scene data (not nodata, not past the edge) to be a chip; "
                   "chips' own, not [tiling] min_valid_fraction (which tiles run classifies).")
@click.option("--split", "split_method", default="blocks", type=click.Choice(["blocks", "scene", "random", "test"]),
              help="blocks: whole spatial blocks per split; scene: whole scenes; random: chip by chip (optimistic); "
                   "test: every chip in test (a set only for scoring).")
@option("--block-size", type=click.FloatRange(0, min_open=True), show_default="4 tile footprints",
              help="Block edge in metres (--split blocks).")
@click.option("--val-fraction", default=0.15, type=click.FloatRange(0, 1, max_open=True),
              help="Share of chips for val (chips' own, not [train] val_fraction, which splits plain image folders).")
@click.option("--test-fraction", default=0.15, type=click.FloatRange(0, 1, max_open=True), help="Share of chips for test.")
@click.option("--seed", default=20261126, type=int, help="Seed of the split.")
@click.option("--overwrite", is_flag=True, help="Replace an existing dataset folder.")
@_verbosity
@click.pass_context
def chips(ctx: click.Context, inputs, labels_path, out, class_field, layer, model_path, config_path, min_cover, min_valid,
          split_method, block_size, val_fraction, test_fraction, seed, overwrite, **_config) -> None:
    """Cut training chips from SCENES (files or folders) where LABELS mark a class: the
    tiles run would classify, as PNGs in DATASET/images/<class>/, with spatially separate
    train/val/test splits, chips.parquet (each chip's scene, window, footprint, class) and
    chips.json. Train on it with: tilescan train DATASET --init default -o MODEL.keras"""

    def body():
        flags, typed = _config_flags(ctx)
        cfg = _load_config(ctx.obj, config_path, flags, typed)
        tilescan.cut_chips(list(inputs), labels_path, out, cfg, class_field=class_field, layer=layer, model=model_path,
                           overwrite=overwrite, min_cover=min_cover, min_valid=min_valid, split=split_method,
                           block_m=block_size, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
        return 0

    _guard(body)


# ----------------------------------------------------------------------------- train


@main.command(epilog=_LAYERS_EPILOG)
@click.argument("data", type=click.Path())
@click.option("-o", "--out", required=True, type=OutPath(dir_okay=False), help="Model file to write (.keras).")
@config_option("TOML config with a [train] section (e.g. configs/aid-resnet18.toml).")
@option("--splits", "splits_dir", type=click.Path(file_okay=False), show_default="DATA/splits if present, else a seeded stratified split",
        help="Folder with train.txt / val.txt split lists.")
@option("--epochs", config_key=("train", "epochs"), type=click.IntRange(min=1), help="Most epochs to train.")
@option("--batch-size", config_key=("train", "batch_size"), type=click.IntRange(min=1), help="Images per training batch.")
@option("--image-size", config_key=("train", "image_size"), type=click.IntRange(min=32), help="Model input edge in pixels.")
@option("--lr", "learning_rate", config_key=("train", "learning_rate"), type=float, help="Peak learning rate.")
@option("--patience", config_key=("train", "patience"), type=click.IntRange(min=0), help="Early-stopping patience in epochs (0 = off).")
@option("--seed", config_key=("train", "seed"), type=int,
        help="Seed of the drawn split, the weights' initialisation and the augmentation (recorded in the model).")
@option("--init", config_key=("train", "init"), show_default="none: from scratch",
        help="Fine-tune from a parent model: 'default' (the packaged model) or a .keras file. Its input size, bands and "
             "normalisation are kept, its backbone weights copied, the head sized to DATA's classes.")
@option("--freeze-epochs", config_key=("train", "freeze_epochs"), type=click.IntRange(min=0),
        help="With --init: epochs that train the new head alone before the whole model.")
@option("--finetune-lr", config_key=("train", "finetune_lr"), type=click.FloatRange(0),
        help="With --init: peak learning rate once the backbone trains (0 = --lr / 10).")
@option("--class-colors", config_key=("train", "class_colors"), type=click.Path(dir_okay=False),
        show_default="tilescan's palette (a parent's own colours with --init)",
        help="Your legend's colours, kept in the model for the label rasters, quicklooks and QGIS styles: a QGIS .qml "
             "style of your labels layer, QGIS's exported colour map, JSON, or lines 'name,#rrggbb'.")
@click.option("--resume", is_flag=True, help="Continue a killed run from its last checkpoint (MODEL.ckpt/ beside -o MODEL.keras).")
@click.option("--overwrite", is_flag=True, help="Replace an existing model file.")
@option("--limit", type=click.IntRange(min=1), show_default="all", help="Use at most N images per split (smoke tests).")
@option("--max-time", type=click.FloatRange(min=0), show_default="no limit", help="Stop once another epoch as long as the last would end past this many seconds (--resume goes on).")
@click.option("--half", is_flag=True, help="Store weights as float16 (half the file size).")
@option("--dataset-name", show_default="the folder name",
        help="Name recorded in the model metadata. AID's citation and terms are recorded with it where the name is "
             "'AID' or the images are AID's (its classes and file names).")
@_verbosity
@click.pass_context
def train(ctx: click.Context, data, out, config_path, splits_dir, resume, overwrite, limit, max_time, half, dataset_name, **_config) -> None:
    """Train a ResNet-18 on DATA, a folder-per-class image dataset (AID layout, plain class
    folders, Train/ Val/ Test/ folders, or a `tilescan chips` dataset), from scratch or
    fine-tuned from a parent (--init). Only the train and val splits are read (the test
    split's image headers are checked where train draws the split)."""
    obj: _Ctx = ctx.obj

    def body():
        _quiet_backend(obj.verbosity)
        flags, typed = _config_flags(ctx)
        cfg = _load_config(obj, config_path, flags, typed)
        verbose = 1 if sys.stdout.isatty() and obj.verbosity >= 0 else (2 if obj.verbosity > 0 else 0)
        try:
            tilescan.train(data, out, cfg, splits=splits_dir, name=dataset_name, resume=resume, overwrite=overwrite,
                           max_seconds=max_time, limit=limit, half=half, verbose=verbose)
        except (KeyboardInterrupt, stop.Interrupted):
            ckpt = Path(out).with_suffix(".ckpt")
            if (ckpt / "state.json").is_file():
                obj.log(f"the finished epochs are in {ckpt}: the same command with --resume goes on from there")
            raise
        return 0

    _guard(body)


# ----------------------------------------------------------------------------- evaluate


@main.command()
@click.argument("model_path", metavar="MODEL")
@click.argument("data", type=click.Path())
@click.option("--split", default="test", type=click.Choice(["train", "val", "test", "all"]),
              help="Which split to score; 'all': every image of DATA (a folder kept for scoring).")
@click.option("-o", "--out", required=True, type=OutPath(), help="Folder for report.json, CSVs and PNGs.")
@option("--splits", "splits_dir", type=click.Path(file_okay=False), show_default="DATA/splits if present, else a seeded stratified split",
        help="Folder with split lists.")
@click.option("--batch-size", default=64, type=click.IntRange(min=1), help="Images per model batch.")
@click.option("--tta", is_flag=True, help="Average over the 8 flips/rotations.")
@click.option("--explain-samples", default=8, type=click.IntRange(min=0), help="Images in explanations.png.")
@click.option("--explanations", is_flag=True, help="Also score CAM faithfulness (deletion/insertion AUC) and cost per method.")
@click.option("--cam", "cam_methods", default="gradcam", type=_CamMethods(),
              help=f"CAM methods for --explanations, comma-separated: {_CAM_HELP}.")
@click.option("--cam-methods", "old_cam_methods", type=_CamMethods(), hidden=True)  # the old spelling of --cam
@option("--faithfulness-images", type=click.IntRange(min=1), show_default="the whole split",
        help="With --explanations: score a seeded sample of N images.")
@click.option("--record", is_flag=True, help="Store the scores in the model file's metadata.")
@option("--limit", type=click.IntRange(min=1), show_default="all", help="Use at most N images, spread over the classes as train --limit picks them (smoke tests).")
@_verbosity
@click.pass_context
def evaluate(ctx: click.Context, model_path, data, split, out, splits_dir, batch_size, tta, explain_samples, explanations, cam_methods,
             old_cam_methods, faithfulness_images, record, limit) -> None:
    """Score MODEL (a .keras file, or 'default' for the packaged model) on a split of DATA:
    accuracy, per-class precision/recall/F1, confusion matrix, explanation figure."""
    obj: _Ctx = ctx.obj
    methods = _old_spelling(ctx, "cam_methods", "old_cam_methods")

    def body():
        _quiet_backend(obj.verbosity)
        tilescan.evaluate(model_path, data, out, split, splits_dir=splits_dir,
                          batch_size=batch_size, tta=tta, explain_samples=explain_samples, explanations=explanations,
                          cam_methods=methods, record=record, limit=limit, faithfulness_limit=faithfulness_images)
        return 0

    _guard(body)


# ----------------------------------------------------------------------------- explain


def _tiles(values: Sequence[str]) -> list[tuple[int, int]]:
    """``--tiles``, given once or more, as (row, col) pairs in the order given."""
    from ..explain.figures import parse_tiles

    try:
        return parse_tiles(" ".join(values))
    except tilescan.ConfigError as exc:
        raise click.BadParameter(exc.message, param_hint="'--tiles'") from None


@main.command()
@click.argument("inputs", nargs=-1, required=True, metavar="IMAGE_OR_SCENE...")
@click.option("-o", "--out", required=True, type=OutPath(), help="Folder for the figures.")
@option("--model", "model_path", envvar="TILESCAN_MODEL", show_envvar=True, type=click.Path(dir_okay=False),
        show_default="the packaged AID model", help="A tilescan .keras model.")
@click.option("--cam", "methods", default="gradcam", type=_CamMethods(), help=f"CAM methods side by side, comma-separated: {_CAM_HELP}.")
@option("--cam-layer", "layer", show_default="the model's last conv block", help="Layer to explain.")
@click.option("--layer", "old_layer", hidden=True)  # the old spelling of --cam-layer
@option("--target", show_default="the prediction", help="Explain this class (name or index).")
@option("--tiles", multiple=True, show_default="the --top N most confident",
        help="Scene tiles as ROW,COL pairs, e.g. '0,1;2,3' (or --tiles 0,1 --tiles 2,3).")
@click.option("--top", default=4, type=click.IntRange(min=1), help="Without --tiles: the N most confident tiles.")
@config_option("TOML config file; its [tiling] section applies, as in run.")
@option("--tile-size", config_key=("tiling", "tile_size"), type=click.IntRange(min=1), show_default="as run: 128",
        help="Tile edge (scene pixels; metres with --units m), as in run.")
@option("--stride", config_key=("tiling", "stride"), type=click.IntRange(min=0), show_default="as run: the tile size",
        help="Step between tiles, as in run: give run's, so ROW,COL are the tiles of its table.")
@option("--units", config_key=("tiling", "units"), type=click.Choice(["auto", "px", "m"], case_sensitive=False), show_default="as run: auto",
        help="Unit of --tile-size, as in run: auto puts the model at its ground scale.")
@option("--min-valid", config_key=("tiling", "min_valid_fraction"), type=click.FloatRange(0, 1), show_default="as run: 0.5",
        help="Without --tiles: the tiles to pick from hold at least this share of valid pixels, as run classifies.")
@option("--nodata", config_key=("tiling", "nodata"), metavar="VALUE|none|file", show_default="as run: file",
        help="The scenes' nodata value, as in run: a number in place of each file's own, none, or file.")
@option("--bands", config_key=("tiling", "bands"), type=_Bands(),
        show_default="auto: the model's scene_bands, else the RGB bands by colour, else the first ones",
        help="1-based scene bands in the model's order, as in run, e.g. 3,2,1 for B,G,R files.")
@_verbosity
@click.pass_context
def explain(ctx: click.Context, inputs, out, model_path, methods, layer, old_layer, target, tiles, top, config_path,
            tile_size, bands, **_config) -> None:
    """The study's figure: original | heatmap | overlay with label and confidence, for
    images or for tiles of a scene, for one or several CAM methods side by side. Scene tiles
    are cut as run cuts them: the same config file, TILESCAN_TILING__* variables and flags."""
    obj: _Ctx = ctx.obj
    layer = _old_spelling(ctx, "layer", "old_layer")

    def body():
        _quiet_backend(obj.verbosity)
        flags, typed = _config_flags(ctx)
        cfg = _load_config(obj, config_path, flags, typed)
        paths = tilescan.explain_figures(list(inputs), out, model=model_path, methods=methods, layer=layer,
                                         target=target, tiles=_tiles(tiles), top=top, config=cfg, tile_size=tile_size,
                                         bands=bands or (), flags=_typed_flags(ctx, "tile_size", "units", "nodata", "bands",
                                                                              "stride", "min_valid"))
        for p in paths:
            click.echo(str(p))
        return 0

    _guard(body)


# ----------------------------------------------------------------------------- collect


@main.command()
@click.argument("out", type=OutPath(file_okay=False))
@click.option("--gpkg/--no-gpkg", default=True, show_default=True, help="Also write a GeoPackage copy.")
@click.option("--styles/--no-styles", default=True, show_default=True,
              help="Write a QGIS style for the table and a QGIS project (collected.qgs).")
@click.option("--require-complete", is_flag=True,
              help="Exit 3 (the set still written) when the latest run failed scenes or left work undone that are "
                   "not in the collected set, or that it meant to redo and did not (the set holds their older "
                   "outputs): for a step that must publish only a whole batch.")
@_verbosity
@click.pass_obj
def collect(obj: _Ctx, out, gpkg, styles, require_complete) -> None:
    """Join the per-scene and per-shard tables of OUT into one GeoParquet dataset
    (OUT/collected/), a GeoPackage copy, a per-class summary and a QGIS project."""

    def body():
        summary = tilescan.collect(out, gpkg=gpkg, styles=styles)  # settled once its set is in place
        failed, undone = summary["failed_in_run"], summary["unfinished_in_run"]
        # outputs the run meant to redo (it failed or was stopped first); not those it was told to keep
        outdated = [u for u in summary["earlier_outputs"] if u.get("error_kind") != "exists"]
        if require_complete and (failed or undone or outdated):
            say(f"tilescan: error: collect: --require-complete: the collected set is not the whole batch: {len(failed)} "
                f"scene(s) failed in the run, {len(undone)} unit(s) or shard(s) left undone, {len(outdated)} "
                "collected from outputs the run meant to redo (summary.json's failed_in_run, unfinished_in_run, "
                "earlier_outputs)")
            return EXIT_PARTIAL
        return 0

    _guard(body)


# ----------------------------------------------------------------------------- info


@main.command()
@click.argument("model_path", required=False, metavar="[MODEL]")
@click.option("--model", "model_option", type=click.Path(dir_okay=False),
              help="The model, as run and chips name it: the same as MODEL.")
@click.option("--runtime", is_flag=True,
              help="Also load Keras and show the backend and device it computes on, and the precision and "
                   "pipeline that [inference] settings resolve to there (warns when a GPU is present but unused).")
@config_option("TOML config file whose [inference] settings --runtime resolves.")
@_verbosity
@click.pass_context
def info(ctx: click.Context, model_path, model_option, runtime, config_path) -> None:
    """Show a model's metadata (default: the packaged model) without loading Keras;
    with --runtime, also the Keras backend and device runs would use."""
    obj: _Ctx = ctx.obj
    if model_path and model_option and Path(model_path).resolve() != Path(model_option).resolve():
        raise click.UsageError("give the model once: as MODEL or as --model", ctx)
    model_path = model_path or model_option
    if config_path and not runtime:
        raise click.UsageError("--config is read only with --runtime", ctx)

    def body():
        import json

        meta = tilescan.describe_model(model_path).meta
        if runtime:
            _quiet_backend(obj.verbosity)
            meta = {**meta, "runtime": tilescan.runtime(config_path)}
            if meta["runtime"]["warning"]:
                obj.log(meta["runtime"]["warning"])
        click.echo(json.dumps(meta, indent=2, ensure_ascii=False))  # a legend's names as written: Étang, not \u00c9tang
        return 0

    _guard(body)


if __name__ == "__main__":  # pragma: no cover
    main()
