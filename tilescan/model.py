"""The ResNet-18 of He et al. (2016) in Keras 3, and its ``.keras`` file with metadata.

Layer names follow the Keras applications convention (``conv5_block2_out`` ...), so a CAM
can target any block by name. The model takes float32 tiles scaled to 0..1 in the band
order of its metadata; per-channel normalisation (mean/std) is the model's first layer, so
a saved model carries it and callers cannot forget it. The head is global average pooling,
a float32 ``logits`` dense layer and a ``predictions`` softmax: CAM methods explain the
logits.

A tilescan model file is an ordinary ``.keras`` archive with one more member,
``tilescan.json``: classes, input size, bands, normalisation, native GSD, training data
and its terms, scores. ``tilescan run`` refuses a model without it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .backend import callers_draws, loading_without_compiles
from .errors import ConfigError, ModelError

META_MEMBER = "tilescan.json"
#: The most classes a model may have: the label raster's values, 255 being "no label".
MAX_CLASSES = 255
#: The largest metadata member read (a model's is a few kB; a zip bomb's is not).
MAX_META_BYTES = 16 << 20
META_FORMAT = "tilescan-model/1"
DEFAULT_CAM_LAYER = "conv5_block2_out"
PACKAGE_MODEL = Path(__file__).parent / "models" / "default.keras"

REQUIRED_KEYS = ("classes", "input_size", "bands", "normalization")


def _keras():
    from .backend import import_keras  # lazily: `tilescan --help` must not pay for TensorFlow

    return import_keras()  # with tilescan's settings for TensorFlow, if this starts it


def _basic_block(x, filters: int, stride: int, name: str, wd_layers: list):
    keras = _keras()
    layers = keras.layers
    shortcut = x
    if stride != 1 or x.shape[-1] != filters:
        shortcut = layers.Conv2D(filters, 1, strides=stride, use_bias=False, name=name + "_0_conv")(x)
        shortcut = layers.BatchNormalization(epsilon=1.001e-5, name=name + "_0_bn")(shortcut)
    y = layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False, name=name + "_1_conv")(x)
    y = layers.BatchNormalization(epsilon=1.001e-5, name=name + "_1_bn")(y)
    y = layers.Activation("relu", name=name + "_1_relu")(y)
    y = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=name + "_2_conv")(y)
    y = layers.BatchNormalization(epsilon=1.001e-5, name=name + "_2_bn")(y)
    y = layers.Add(name=name + "_add")([shortcut, y])
    return layers.Activation("relu", name=name + "_out")(y)


def build_resnet18(
    input_shape: Sequence[int] = (128, 128, 3),
    num_classes: int = 30,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    name: str = "resnet18",
):
    """ResNet-18: 7×7/2 stem, 3×3/2 max-pool, four stages of two basic blocks
    (64, 128, 256, 512 channels), global average pooling, dense softmax.

    ``input_shape`` is (H, W, C); H and W may be None for any tile size. ``mean``/``std``
    (per channel, on the 0..1 scale) become the first layer; None means identity.
    """
    keras = _keras()
    layers = keras.layers
    channels = int(input_shape[-1])
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    x = inputs
    if mean is not None or std is not None:
        m = list(mean) if mean is not None else [0.0] * channels
        s = list(std) if std is not None else [1.0] * channels
        x = layers.Normalization(mean=m, variance=[v * v for v in s], name="normalize")(x)
    x = layers.ZeroPadding2D(3, name="conv1_pad")(x)
    x = layers.Conv2D(64, 7, strides=2, use_bias=False, name="conv1_conv")(x)
    x = layers.BatchNormalization(epsilon=1.001e-5, name="conv1_bn")(x)
    x = layers.Activation("relu", name="conv1_relu")(x)
    x = layers.ZeroPadding2D(1, name="pool1_pad")(x)
    x = layers.MaxPooling2D(3, strides=2, name="pool1_pool")(x)
    wd: list = []
    for stage, filters in zip(range(2, 6), (64, 128, 256, 512)):
        for block in (1, 2):
            stride = 2 if (block == 1 and stage > 2) else 1
            x = _basic_block(x, filters, stride, f"conv{stage}_block{block}", wd)
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    logits = layers.Dense(num_classes, dtype="float32", name="logits")(x)
    outputs = layers.Activation("softmax", dtype="float32", name="predictions")(logits)
    return keras.Model(inputs, outputs, name=name)


def conv_layer_names(model) -> list[str]:
    """Names of the block outputs a CAM can target, shallow to deep."""
    return [l.name for l in model.layers if l.name.endswith("_out") or l.name == "conv1_relu"]


@dataclass
class LoadedModel:
    model: Any
    meta: dict[str, Any]
    path: str
    sha256: str

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    @property
    def colors(self) -> tuple[tuple[int, int, int], ...]:
        """Each class's colour in the outputs: the legend's own (``legend.colors``, from ``train
        --class-colors``), else tilescan's palette."""
        from .outputs.palette import model_colors

        return model_colors(len(self.meta["classes"]), (self.meta.get("legend") or {}).get("colors"))

    @property
    def own_colors(self) -> list[str] | None:
        """The legend's own colours as stored (``#rrggbb``), None where the palette's are used."""
        own = (self.meta.get("legend") or {}).get("colors")
        return list(own) if own and len(own) == len(self.meta["classes"]) else None

    @property
    def input_size(self) -> int:
        return int(self.meta["input_size"][0])

    @property
    def num_bands(self) -> int:
        return len(self.meta["bands"])

    def __repr__(self) -> str:  # not the metadata's every field (thousands of characters in a notebook)
        k = len(self.meta.get("classes") or ())
        return (f"LoadedModel({self.model_id!r}, {k} classes, {self.meta.get('input_size', ['?'])[0]} px, "
                f"{'loaded' if self.model is not None else 'metadata only'}, path={self.path!r})")

    @property
    def model_id(self) -> str:
        return str(self.meta.get("id") or f"{Path(self.path).stem}-{self.sha256[:12]}")

    @property
    def cam_layer(self) -> str:
        return str(self.meta.get("cam_layer") or DEFAULT_CAM_LAYER)

    def open_scene(self, path, tiling):
        """:func:`tilescan.scene.plan.open_scene` for this model's bands, input size and scale."""
        from .scene.plan import open_scene

        return open_scene(path, self.tiling_for(tiling), *self.scene_args())

    def band_warning(self, reader, path: str) -> dict | None:
        """:func:`tilescan.scene.bands.band_warning` for a scene this model opened (with its own
        ``scene_bands``, where it was trained on chips of other bands)."""
        from .scene.bands import band_warning

        own = [int(b) for b in self.meta.get("scene_bands") or ()]
        return band_warning(reader.info, reader.bands, self.meta.get("bands"), path, own)

    def tiling_for(self, tiling):
        """``tiling`` with the scene bands this model's chips were cut from (``scene_bands``,
        ``tilescan chips --bands``) where it names none: a model trained on NIR, red, green
        chips reads those bands, not the scene's red, green, blue."""
        import dataclasses

        bands = self.meta.get("scene_bands")
        if tiling.bands or not bands:
            return tiling
        out = dataclasses.replace(tiling, bands=tuple(int(b) for b in bands))
        said = f"the model's scene_bands {','.join(str(b) for b in bands)} (its chips' --bands; give --bands for others)"
        object.__setattr__(out, "_origins", {**getattr(tiling, "_origins", {}), "bands": said})
        return out

    def auto_bands(self, path, tiling) -> list[int] | None:
        """The scene bands this model reads from ``path`` where none are given (its ``scene_bands``,
        else the automatic pick); None where the scene cannot be opened."""
        import dataclasses

        from .scene.plan import auto_bands

        own = self.tiling_for(dataclasses.replace(tiling, bands=())).bands
        return list(own) if own else auto_bands(path, tiling, self.num_bands, self.meta.get("bands"))

    def tile_sizes(self, path, tiling) -> tuple[int, int] | None:
        """The tile and stride in scene pixels a run with ``tiling`` would cut ``path`` into;
        None where the scene cannot be opened."""
        from .scene.plan import tile_sizes

        return tile_sizes(path, tiling, self.input_size, self.meta.get("gsd_m"), self.scale_range)

    def scene_args(self) -> tuple:
        """What :func:`tilescan.scene.plan.open_scene` takes of the model, after the path and tiling."""
        return self.num_bands, self.input_size, self.meta.get("gsd_m"), self.meta.get("bands"), self.scale_range

    @property
    def scale_range(self) -> tuple[float, float] | None:
        """Metres per model input pixel within which the model keeps its accuracy (None: unknown)."""
        rng = (self.meta.get("scale") or {}).get("input_gsd_m")
        return None if not rng else (float(rng[0]), float(rng[1]))


_HASHED: dict[tuple, str] = {}  # (device, inode, size, mtime, ctime) -> sha256 of that file
_HASHED_LOCK = threading.Lock()


def file_identity(st: os.stat_result) -> tuple:
    """A file's version as a cache may key it: a copy put in its place differs (cp -p and rsync -t keep size and mtime)."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """The file's sha256 (hex). Remembered for the process while the file is unchanged (same
    inode, size, change and modification times): every run reports its model's, and a
    process running many (the Python API, one run per chip) should not hash it each time."""
    before = file_identity(os.stat(path))
    with _HASHED_LOCK:
        known = _HASHED.get(before)
    if known is not None:
        return known
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    digest = h.hexdigest()
    if file_identity(os.stat(path)) == before:  # not changed while it was read
        with _HASHED_LOCK:
            _HASHED[before] = digest
    return digest


def class_names_problem(classes: Sequence[Any]) -> str | None:
    """What makes ``classes`` unfit to name a model's classes, each a value of its label raster,
    its styles and tables: a name empty, not text or with control characters, one twice, more
    than :data:`MAX_CLASSES`. None when they are fit."""
    odd = [c for c in classes if not isinstance(c, str) or not c.strip() or any(ord(ch) < 32 or ord(ch) == 127 for ch in c)]
    twice = sorted({c for c in classes if classes.count(c) > 1}) if not odd else []
    if odd:
        return f"must be names, not empty or with control characters: {odd[0]!r}"
    if twice:
        return f"names {twice[0]!r} twice"
    if len(classes) > MAX_CLASSES:
        return f"has {len(classes)}: a label raster (uint8, {MAX_CLASSES} = no label) holds at most {MAX_CLASSES}"
    return None


def validate_metadata(meta: Any, path: str) -> dict[str, Any]:
    if not isinstance(meta, dict):
        raise ModelError("tilescan metadata is not a JSON object", path=path)
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise ModelError(f"tilescan metadata lacks {', '.join(missing)}", path=path)
    classes = meta["classes"]
    if not isinstance(classes, list) or not classes:
        raise ModelError("tilescan metadata 'classes' must be a non-empty list", path=path)
    if problem := class_names_problem(classes):
        raise ModelError(f"tilescan metadata 'classes' {problem}", path=path)
    scale = meta.get("scale")
    rng = scale.get("input_gsd_m") if isinstance(scale, dict) else scale
    if rng is not None and not (isinstance(rng, list) and len(rng) == 2
                                and all(isinstance(v, (int, float)) for v in rng) and 0 < rng[0] <= rng[1]):
        raise ModelError("tilescan metadata 'scale.input_gsd_m' must be [lo, hi] metres with 0 < lo <= hi", path=path)
    colors = (meta.get("legend") or {}).get("colors") if isinstance(meta.get("legend"), dict) else None
    if colors is not None:
        from .outputs.palette import parse_color

        try:
            if not isinstance(colors, list) or len(colors) != len(meta["classes"]):
                raise ValueError(f"{len(colors) if isinstance(colors, list) else 'no list of'} colours")
            for c in colors:
                parse_color(c)
        except ValueError as e:
            raise ModelError(f"tilescan metadata 'legend.colors' must be a #rrggbb per class "
                             f"({len(meta['classes'])}): {e}", path=path) from None
    return meta


def model_path(path: str | os.PathLike | None) -> str:
    """The model file to use: ``path``, or the packaged default (None, or ``"default"`` where
    no file of that name is in the working folder); a :class:`LoadedModel` stands for its file."""
    if isinstance(path, LoadedModel):
        path = path.path
    elif path is not None and not isinstance(path, (str, os.PathLike)):
        raise ConfigError(f"model must be a .keras file's path, \"default\" or what tilescan.load_model() returns, "
                          f"not a {type(path).__name__}")
    if path is not None and str(path) == "default" and not os.path.exists("default"):
        path = None
    p = str(path) if path is not None else str(PACKAGE_MODEL)
    if path is None and not os.path.exists(p):
        raise ModelError("the packaged default model is missing; pass --model PATH", path=p)
    return p


def describe_model(path: str | os.PathLike | None = None) -> LoadedModel:
    """A model's metadata and hash without loading Keras (``.model`` is None)."""
    p = model_path(path)
    meta = read_metadata(p)
    return LoadedModel(model=None, meta=meta, path=p, sha256=file_sha256(p))


def _meta_json(meta: dict) -> bytes:
    """The ``tilescan.json`` member: strict JSON, a non-finite number (a diverged training's
    loss) as null, which every reader parses (Python alone reads a bare NaN)."""
    from .outputs.files import _jsonable

    return json.dumps(_jsonable(meta), indent=2, sort_keys=True, allow_nan=False).encode("utf-8")


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``tilescan.json`` of a model file, without loading Keras."""
    p = str(path)
    if not os.path.exists(p):
        raise ModelError("model file not found" + (" (a broken link)" if os.path.islink(p) else ""), path=p)
    if os.path.isdir(p):
        raise ModelError("model path is a directory; expected a .keras file", path=p)
    try:
        with zipfile.ZipFile(p) as zf:
            names = zf.namelist()
            if "config.json" not in names:
                raise ModelError("not a Keras 3 .keras archive (no config.json inside)", path=p)
            if META_MEMBER not in names:
                raise ModelError(
                    "this Keras model has no tilescan metadata (classes, input size, bands, "
                    "normalisation); save it with tilescan.model.save_model or train it with "
                    "`tilescan train`",
                    path=p,
                )
            if zf.getinfo(META_MEMBER).file_size > MAX_META_BYTES:
                raise ModelError(f"tilescan metadata of {zf.getinfo(META_MEMBER).file_size >> 20} MiB: over the "
                                 f"{MAX_META_BYTES >> 20} MiB a model's metadata may take", path=p)
            meta = json.loads(zf.read(META_MEMBER).decode("utf-8"))
    except zipfile.BadZipFile:
        scene = Path(p).suffix.lower() in (".tif", ".tiff", ".vrt", ".jp2", ".img")
        raise ModelError("not a .keras model file (not a zip archive, or a corrupt one)" + (
            "; tilescan info describes models: for a scene, `gdalinfo` tells what it holds and `tilescan run` "
            "checks it" if scene else ""), path=p) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"tilescan metadata is not valid JSON: {exc}", path=p) from None
    return validate_metadata(meta, p)


def _load_failure(exc: Exception, path: Path, installed: str) -> str:
    """Why Keras could not load a model file, short, and what to do where the file was saved by
    a newer Keras than the one installed (its layers may take options this one does not know)."""
    text = f"{type(exc).__name__}: {exc}"
    if len(text) > 800:  # Keras quotes a whole layer's config in some messages; the cause ends them
        text = f"{text[:300]} … {text[-400:]}"
    try:
        with zipfile.ZipFile(path) as zf:
            if zf.getinfo("metadata.json").file_size > 1 << 20:  # Keras' own is a line: not read whole
                raise ValueError("too big")
            saved = str(json.loads(zf.read("metadata.json")).get("keras_version") or "")
    except (OSError, KeyError, ValueError, AttributeError, zipfile.BadZipFile):
        saved = ""

    def release(v: str) -> tuple[int, ...]:
        return tuple(int(n) for n in re.findall(r"\d+", v)[:3])

    if saved and release(saved) > release(installed):
        text += (f"; the file was saved by Keras {saved}, newer than the installed {installed}: "
                 f"upgrade it (pip install -U \"keras>={saved}\")")
    return f"cannot load the Keras model: {text}"


def load_model(path: str | os.PathLike | None = None) -> LoadedModel:
    """Load a tilescan model (the packaged default when ``path`` is None)."""
    p = model_path(path)
    meta = read_metadata(p)
    if not str(p).lower().endswith(".keras"):  # Keras picks the format by the name: an .h5 would be read as HDF5
        raise ModelError("a .keras model archive under another name: Keras reads a model by its file name's "
                         "extension; rename it to end in .keras", path=str(p))
    keras = _keras()
    try:
        with loading_without_compiles(keras), callers_draws():  # Keras draws layer seeds from Python's random
            model = keras.saving.load_model(p, compile=False)
    except Exception as exc:  # Keras raises many types for a damaged archive
        raise ModelError(_load_failure(exc, p, keras.__version__), path=p) from None
    n_out = int(model.output_shape[-1])
    if n_out != len(meta["classes"]):
        raise ModelError(
            f"the model has {n_out} outputs but its metadata names {len(meta['classes'])} classes", path=p
        )
    n_in = model.input_shape[-1]
    if n_in is not None and int(n_in) != len(meta["bands"]):
        raise ModelError(f"the model takes {n_in} bands but its metadata lists {len(meta['bands'])}", path=p)
    return LoadedModel(model=model, meta=meta, path=p, sha256=file_sha256(p))


def rewrite_metadata(path: str | os.PathLike, update) -> str:
    """Change a model file's metadata in place: ``update(meta)`` edits the dict, the
    ``tilescan.json`` member is replaced and every other member copied unchanged (same
    name, date, compression), through a temporary file and an atomic rename. Returns the
    new sha256."""
    p = Path(path)
    meta = read_metadata(p)
    update(meta)
    new_meta = _meta_json(meta)
    mode = os.stat(p).st_mode & 0o777
    with _replacing(p) as tmp:
        with zipfile.ZipFile(p) as zin, zipfile.ZipFile(tmp, "w") as zout:
            for info in zin.infolist():
                data = new_meta if info.filename == META_MEMBER else zin.read(info)
                zout.writestr(info, data, compress_type=info.compress_type)
        read_metadata(tmp)  # the rewritten archive must read back before it replaces the model
        os.chmod(tmp, mode)
    return file_sha256(p)


def _replacing(path: Path):
    """``writers.atomic_output`` (temporary file beside ``path``, renamed over it on success)."""
    from .outputs.files import atomic_output

    return atomic_output(path)


def _halve_weights(h5_bytes: bytes) -> bytes:
    """Rewrite a Keras weights .h5 with float32 arrays stored as float16 (half the size)."""
    import h5py
    import numpy as np

    src = h5py.File(io.BytesIO(h5_bytes), "r")
    buf = io.BytesIO()
    dst = h5py.File(buf, "w")

    def copy(g_src, g_dst):
        for k, v in g_src.attrs.items():
            g_dst.attrs[k] = v
        for name, item in g_src.items():
            if isinstance(item, h5py.Group):
                copy(item, g_dst.create_group(name))
            else:
                data = item[()]
                if isinstance(data, np.ndarray) and data.dtype == np.float32:
                    data = data.astype(np.float16)
                ds = g_dst.create_dataset(name, data=data)
                for k, v in item.attrs.items():
                    ds.attrs[k] = v

    copy(src, dst)
    dst.close()
    src.close()
    return buf.getvalue()


def save_model(model, path: str | os.PathLike, meta: dict[str, Any], half: bool = False) -> str:
    """Save ``model`` as ``.keras`` with ``meta`` inside, atomically (temp file + rename).

    ``half`` stores the weights as float16 (they load back into float32 variables).
    Returns the file's sha256.
    """
    p = Path(path)
    if p.suffix != ".keras":
        raise ModelError("model files must end in .keras", path=str(p))
    meta = dict(meta)
    meta.setdefault("format", META_FORMAT)
    meta.setdefault("architecture", "resnet18")
    meta.setdefault("cam_layer", DEFAULT_CAM_LAYER)
    meta.setdefault("input_size", [int(model.input_shape[1]), int(model.input_shape[2])])
    validate_metadata(meta, str(p))
    p.parent.mkdir(parents=True, exist_ok=True)
    with _replacing(p) as tmp:
        _keras().saving.save_model(model, tmp)
        with zipfile.ZipFile(tmp) as zf:
            members = {n: zf.read(n) for n in zf.namelist()}
        if half and "model.weights.h5" in members:
            members["model.weights.h5"] = _halve_weights(members["model.weights.h5"])
        members[META_MEMBER] = _meta_json(meta)
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for name, data in members.items():
                zf.writestr(name, data)
        os.chmod(tmp, 0o644)
    return file_sha256(p)
