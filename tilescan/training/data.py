"""Folder-per-class image datasets: discovery, splits, and a streaming batch loader.

Layouts understood (DATA is the path given on the command line):

* ``DATA/images/<Class>/*.jpg`` with optional ``DATA/classes.txt`` and ``DATA/splits/``
  (``train.txt``, ``val.txt``, ``test.txt``: paths relative to ``images/``) -- the AID layout;
* ``DATA/<Class>/*.jpg`` -- a plain folder per class;
* ``DATA/Train/<Class>/...``, ``DATA/Val/<Class>/...`` (optional), ``DATA/Test/<Class>/...``.

Without split lists or split folders a seeded, stratified split is drawn. Only the splits
a caller asks for are ever opened: ``tilescan train`` asks for train and val, so it never
decodes a test image.

The loader decodes, augments and batches on the fly in worker threads (OpenCV releases
the GIL); it never holds the dataset in memory. It imports Keras only to subclass
``keras.utils.PyDataset``.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..errors import ConfigError, InputError
from ..log import quiet_opencv

ALL = "all"  # the split that scores every image of the dataset (evaluate --split all)
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp"}
SPLITS = ("train", "val", "test")
_SPLIT_ALIASES = {"train": ("train", "training"), "val": ("val", "valid", "validation"), "test": ("test", "testing")}

AID_CITATION = (
    'G.-S. Xia, J. Hu, F. Hu, B. Shi, X. Bai, Y. Zhong, L. Zhang and X. Lu, "AID: A Benchmark '
    'Data Set for Performance Evaluation of Aerial Scene Classification", IEEE Transactions on '
    "Geoscience and Remote Sensing 55(7):3965-3981, 2017"
)
AID_TERMS = (
    "AID is released by its authors for research use; models trained on it inherit that "
    "restriction. The images come from Google Earth."
)

#: AID's 30 classes, as its folders name them.
AID_CLASSES = frozenset("Airport BareLand BaseballField Beach Bridge Center Church Commercial DenseResidential Desert "
                        "Farmland Forest Industrial Meadow MediumResidential Mountain Park Parking Playground Pond Port "
                        "RailwayStation Resort River School SparseResidential Square Stadium StorageTanks Viaduct".split())


@dataclass
class Dataset:
    """Classes and the items (relative path, class index) of each split."""

    root: Path
    classes: list[str]
    splits: dict[str, list[tuple[str, int]]]
    split_source: str
    split_sha256: dict[str, str] = field(default_factory=dict)
    name: str = ""

    def items(self, split: str) -> list[tuple[str, int]]:
        if split not in self.splits:
            if self.split_source.startswith("lists:"):
                where = Path(self.split_source[len("lists:"):])
                raise InputError(f"dataset has no '{split}' split: no {split}.txt in the splits folder (has: "
                                 f"{', '.join(s + '.txt' for s in self.splits)})", path=str(where))
            raise InputError(f"dataset has no '{split}' split (has: {', '.join(self.splits)})", path=str(self.root))
        return self.splits[split]

    def all_items(self) -> list[tuple[str, int]]:
        """Every image of the dataset, its splits one after the other (they share no image)."""
        return [it for s in SPLITS for it in self.splits.get(s, [])]

    def check_found(self, **items_of: list[tuple[str, int]]) -> None:
        """Every image of the items given per split (``train=[...]``) exists and is an 8-bit
        image in one piece (:func:`_image_problem`: its header and last bytes, not its pixels):
        checked before a model loads, not an epoch or a scoring pass into the work."""
        lists = self.split_source.startswith("lists:")
        said, wheres = [], set()  # every kind of problem of every split, so that one pass finds them all
        for split, items in items_of.items():
            problems: dict[str, list[str]] = {}
            missing = [p for p, _ in items if not (self.root / p).is_file()]
            if missing:
                problems["is not found under " + str(self.root)] = missing
            for p, _ in items if not missing else ():
                if why := _image_problem(self.root / p):
                    problems.setdefault(why, []).append(p)
            for why, found in problems.items():
                more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
                whose = "image" if split == ALL else f"the {split} split's image"  # every image, in no split
                said.append(f"{whose} '{found[0]}'{more} {why}")
                wheres.add(Path(self.split_source[len("lists:"):]) / f"{split}.txt" if lists and split != ALL else self.root)
        if said:
            where = wheres.pop() if len(wheres) == 1 else self.root
            raise InputError("; ".join(said), path=str(where))

    def paths(self, split: str) -> list[Path]:
        return [self.root / p for p, _ in self.items(split)]

    def labels(self, split: str) -> np.ndarray:
        return np.array([c for _, c in self.items(split)], dtype=np.int64)

    def provenance(self) -> dict:
        # names, not this machine's paths: the metadata ships with the model
        source = self.split_source
        if source.startswith("lists:"):
            source = "lists:" + Path(source[len("lists:"):]).name
        info = {
            "dataset": self.name,
            "root": self.root.name,
            "split_source": source,
            "split_sha256": self.split_sha256,
            "counts": {k: len(v) for k, v in self.splits.items()},
        }
        if self.name.lower() == "aid" or self.looks_like_aid():
            info["citation"] = AID_CITATION
            info["terms"] = AID_TERMS
        return info

    def looks_like_aid(self) -> bool:
        """Whether AID's images are among these, whatever the folder's name (a subset of AID, or
        AID with classes of one's own): an image named as AID names them (``airport_12.jpg`` in
        ``Airport``), in any format. Its terms then go with the model."""
        return any(self.classes[c] in AID_CLASSES and re.fullmatch(
            rf"{self.classes[c].lower()}_\d+\.\w+", Path(p).name.lower()) for s in ("train", "val")
            for p, c in self.splits.get(s, []))


_NOT_AN_IMAGE = "cannot be read as an image (empty, not an image, or corrupt)"
_EIGHT_BIT = {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr"}
_MAKE_CHIPS = ("images to train or evaluate on are 8-bit RGB; cut 8-bit chips from scenes with 'tilescan chips' "
               "(stretched as run stretches a scene)")


def _image_problem(path: Path) -> str | None:
    """What keeps ``path`` from being a training image, from its header and last bytes (its
    pixels are not decoded): not an image, not 8-bit, or cut short. None for a good one, and
    for an 8-bit TIFF only GDAL reads the header of."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            size, mode, kind, depth = (im.width, im.height), im.mode, im.format, _bit_depth(im, path)
    except Exception:  # noqa: BLE001 - whatever the file is, it is no image Pillow reads
        return _not_pillows(path)
    if not all(size):
        return _NOT_AN_IMAGE
    if mode not in _EIGHT_BIT or depth > 8:
        return f"is not 8-bit ({kind}, {depth}-bit {mode}): {_MAKE_CHIPS}"
    if kind in _END_MARKERS and _cut_short(path, _END_MARKERS[kind]):
        return (f"is cut short (its {kind} end marker is missing: an interrupted copy or download); its missing "
                "part would be learned or scored as grey: copy it again, or leave it out")
    return None


def _bit_depth(im, path: Path) -> int:
    """Bits per sample as the file stores them (Pillow opens a 16-bit colour PNG as 8-bit RGB)."""
    if im.format == "PNG":
        with open(path, "rb") as f:
            f.seek(24)  # IHDR's bit depth, after the signature, the chunk's length and type, width and height
            return f.read(1)[0]
    bits = getattr(im, "tag_v2", {}).get(258) if im.format == "TIFF" else None
    return max(bits) if isinstance(bits, tuple) else int(bits or 8)


_END_MARKERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND"}  # a whole file ends with its end marker


def _cut_short(path: Path, marker: bytes) -> bool:
    """Whether the file's last bytes hold no end marker (a few bytes after it are allowed)."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - min(1024, size // 2)))
        return marker not in f.read()


def _not_pillows(path: Path) -> str | None:
    """What is wrong with a file Pillow cannot read, as GDAL reads a TIFF: other bands or bit
    depth than 8-bit grey or colour (those OpenCV decodes for training: None); else no image."""
    if path.suffix.lower() not in (".tif", ".tiff"):
        return _NOT_AN_IMAGE
    try:
        from ..scene.info import open_quiet  # a plain image has no georeferencing: no warning of it

        with open_quiet(path) as ds:
            bands, dtype = ds.count, ds.dtypes[0]
    except Exception:  # noqa: BLE001 - no TIFF GDAL reads either
        return _NOT_AN_IMAGE
    if dtype == "uint8" and bands in (1, 3, 4):
        return None
    return f"is a TIFF of {bands} {dtype} band(s): {_MAKE_CHIPS}"


def _visible(p: Path) -> bool:
    """Not hidden (``.name``: a ``.ipynb_checkpoints``, macOS's ``._name.jpg``) nor a zip's ``__MACOSX``."""
    return not p.name.startswith(".") and p.name != "__MACOSX"


def _is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTS and _visible(p) and p.is_file()


def _walk_images(folder: Path) -> Iterator[Path]:
    """The images of a class folder, its subfolders' included (hidden ones left out), as found."""
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if _visible(Path(d))]
        yield from (f for f in (Path(root, name) for name in files) if _is_image(f))


def _say_dangling(root: Path) -> None:
    """A warning for image files that are links to nothing (a git-annex or DataLad dataset
    whose content was not fetched): left out as no image, which alone says nothing."""
    gone = []
    for r, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if _visible(Path(d))]
        gone += [Path(r, f) for f in files if Path(f).suffix.lower() in IMAGE_EXTS and _visible(Path(f))
                 and not Path(r, f).exists()]
    if gone:
        from ..log import emit

        emit(f"warning: {len(gone)} image file(s) under {root} are links to nothing and are left out (e.g. "
             f"{gone[0].relative_to(root)}): a git-annex or DataLad dataset whose content is not fetched "
             "('git annex get' / 'datalad get')?")


def _nfc(name: str) -> str:
    """A class name as one Unicode form (macOS writes folder names decomposed: 'Forêt' is then
    another string than the same name typed elsewhere)."""
    return unicodedata.normalize("NFC", name)


def _class_dirs(root: Path) -> list[str]:
    return sorted({_nfc(d.name) for d in _folders(root) if any(_walk_images(d))})


def _folders(root: Path) -> list[Path]:
    return [d for d in root.iterdir() if d.is_dir() and _visible(d) and d.name != "splits"]


def _say_odd_classes(data: Path, roots: Sequence[Path], classes: Sequence[str]) -> None:
    """Warnings for class folders of ``roots`` (each split's, or the one) with no image (left out),
    named alike but for case (one folder on macOS and Windows) or in two Unicode forms (one class)."""
    from ..log import emit

    empty = sorted({d.name for r in roots for d in _folders(r) if _nfc(d.name) not in classes}, key=str)
    if classes and empty:
        emit(f"warning: {data}: class folder(s) {', '.join(map(repr, empty))} hold no image: left out of the legend")
    folded, forms = {}, {}
    for c in classes:
        folded.setdefault(c.casefold(), []).append(c)
    for r, d in ((r, d) for r in roots for d in _folders(r) if _nfc(d.name) in classes):
        forms.setdefault((r, _nfc(d.name)), set()).add(d.name)  # in one folder: two folders, on any system
    for alike in (names for names in folded.values() if len(names) > 1):
        emit(f"warning: {data}: class folders {', '.join(map(repr, alike))} differ only in case: {len(alike)} classes "
             "here, one folder on macOS and Windows; rename or merge them")
    for c, names in sorted({(c, tuple(sorted(n))) for (_, c), n in forms.items() if len(n) > 1}):
        emit(f"warning: {data}: class folders {', '.join(map(ascii, names))} are one name in two Unicode forms (as "
             f"macOS writes it and not): their images are one class {c!r}; rename one if they are not")


def _read_classes(*candidates: Path) -> list[str] | None:
    for c in candidates:
        if c.is_file():
            names = [_nfc(ln.strip()) for ln in c.read_text().splitlines() if ln.strip()]
            if names:
                return names
    return None


def _hash_lines(lines: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _list_items(root: Path, rel_root: Path, classes: list[str]) -> list[tuple[str, int]]:
    index = {c: i for i, c in enumerate(classes)}
    items = []
    for cls in sorted(d.name for d in root.iterdir() if d.is_dir() and _visible(d)):
        images = sorted(_walk_images(root / cls))
        if _nfc(cls) not in index and images:  # a folder without images (a class to come) has nothing to train on
            raise InputError(f"class folder '{cls}' is not in the class list {classes}", path=str(root))
        items += [(str(f.relative_to(rel_root)), index[_nfc(cls)]) for f in images]
    return items


def _check_disjoint(splits: dict[str, list[tuple[str, int]]], lists_dir: Path) -> None:
    """Split lists that share an image: a model scored on images it was trained on scores too high."""
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        shared = sorted({p for p, _ in splits.get(a, [])} & {p for p, _ in splits.get(b, [])})
        if shared:
            more = f" and {len(shared) - 1} more" if len(shared) > 1 else ""
            raise InputError(f"{a}.txt and {b}.txt share images ('{shared[0]}'{more}): each image belongs to one "
                             "split", path=str(lists_dir))


def stratified_split(
    items: list[tuple[str, int]], val_fraction: float, test_fraction: float, seed: int
) -> dict[str, list[tuple[str, int]]]:
    """Split each class's items (sorted, then shuffled with ``seed``) into train/val/test."""
    rng = np.random.default_rng(seed)
    out: dict[str, list[tuple[str, int]]] = {s: [] for s in SPLITS}
    by_class: dict[int, list[tuple[str, int]]] = {}
    for it in sorted(items):
        by_class.setdefault(it[1], []).append(it)
    for c in sorted(by_class):
        group = by_class[c]
        order = rng.permutation(len(group))
        n_test = int(round(len(group) * test_fraction))
        n_val = int(round(len(group) * val_fraction))
        for rank, i in enumerate(order):
            split = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
            out[split].append(group[i])
    return out


def load_dataset(
    data: str | Path,
    splits_dir: str | Path | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 20261126,
) -> Dataset:
    """Discover classes and splits of an image dataset (see the module docstring)."""
    data = Path(data)
    if not data.exists():
        raise InputError("dataset folder not found", path=str(data))
    if not data.is_dir():
        raise InputError("dataset path is not a folder", path=str(data))
    name = data.name if data.name.lower() != "images" else data.parent.name
    _say_dangling(data)

    split_folders = {}
    for d in data.iterdir():
        for split, aliases in _SPLIT_ALIASES.items():
            if d.is_dir() and d.name.lower() in aliases:
                split_folders[split] = d
    if split_folders and splits_dir is None:
        classes = _read_classes(data / "classes.txt") or sorted(
            set().union(*(_class_dirs(d) for d in split_folders.values()))
        )
        _say_odd_classes(data, list(split_folders.values()), classes)
        splits = {s: _list_items(d, data, classes) for s, d in split_folders.items()}
        if "val" not in splits and "train" in splits:
            # carve a validation split out of train, stratified and seeded
            tv = stratified_split(splits["train"], val_fraction / max(1e-9, 1 - test_fraction), 0.0, seed)
            splits["train"], splits["val"] = tv["train"], tv["val"]
        return Dataset(data, classes, splits, "folders", {s: _hash_lines([p for p, _ in v]) for s, v in splits.items()}, name)

    image_root = data / "images" if (data / "images").is_dir() else data
    classes = _read_classes(data / "classes.txt", image_root / "classes.txt") or _class_dirs(image_root)
    _say_odd_classes(data, [image_root], classes)
    if not classes:
        raise InputError("no class folders with images found", path=str(image_root))
    index = {c: i for i, c in enumerate(classes)}
    lists_dir = Path(splits_dir) if splits_dir is not None else (data / "splits" if (data / "splits").is_dir() else None)
    if lists_dir is not None:
        if not lists_dir.is_dir():
            raise InputError("splits folder not found", path=str(lists_dir))
        splits = {}
        hashes = {}
        for split in SPLITS:
            f = lists_dir / f"{split}.txt"
            if not f.is_file():
                continue
            lines = [ln.strip() for ln in f.read_text().splitlines() if ln.strip()]
            hashes[split] = hashlib.sha256(f.read_bytes()).hexdigest()
            items = []
            for ln in lines:
                cls = _nfc(Path(ln).parts[0])
                if cls not in index:
                    raise InputError(f"line '{ln}': class folder '{cls}' is not a known class", path=str(f))
                items.append((ln, index[cls]))
            splits[split] = items
        if not splits:  # which ones a command needs, it asks for (train: train and val; evaluate: one)
            raise InputError("no split lists (train.txt, val.txt, test.txt) in the splits folder", path=str(lists_dir))
        _check_disjoint(splits, lists_dir)
        return Dataset(image_root, classes, splits, f"lists:{lists_dir}", hashes, name)

    items = _list_items(image_root, image_root, classes)
    splits = stratified_split(items, val_fraction, test_fraction, seed)
    hashes = {s: _hash_lines([p for p, _ in v]) for s, v in splits.items()}
    return Dataset(image_root, classes, splits, f"stratified(seed={seed})", hashes, name)


def twins(dataset: Dataset) -> list[list[tuple[str, str]]]:
    """Images with the same bytes in two classes (a label conflict) or two splits (a test image
    trained on): groups of ``(split, path)``, found by size first, so only files of one size are
    read; twins within one class and split are left out (harmless)."""
    by_size: dict[int, list[tuple[str, str, int]]] = {}
    for split in SPLITS:
        for p, c in dataset.splits.get(split, []):
            try:
                by_size.setdefault((dataset.root / p).stat().st_size, []).append((split, p, c))
            except OSError:
                continue  # missing: check_found names it
    found = []
    for same in (v for v in by_size.values() if len(v) > 1):
        by_bytes: dict[bytes, list[tuple[str, str, int]]] = {}
        for split, p, c in same:
            with contextlib.suppress(OSError):
                by_bytes.setdefault(hashlib.blake2b((dataset.root / p).read_bytes(), digest_size=16).digest(),
                                    []).append((split, p, c))
        found += [[(s_, p) for s_, p, _ in g] for g in by_bytes.values()
                  if len(g) > 1 and (len({c for *_, c in g}) > 1 or len({s_ for s_, *_ in g}) > 1)]
    return sorted(found)


def spread(items: list[tuple[str, int]], limit: int) -> list[tuple[str, int]]:
    """``limit`` of ``items`` taken from each class in turn (each class's own evenly spread over
    its list), so every class is represented whatever order the split list is in (a chips
    dataset lists its chips scene by scene, where one class may fill the first hundreds)."""
    by_class: dict[int, list[int]] = {}
    for i, (_, c) in enumerate(items):
        by_class.setdefault(c, []).append(i)
    queues = [own[:: max(1, len(own) // limit)] for _, own in sorted(by_class.items())]
    picked: list[int] = []
    for turn in range(max(map(len, queues), default=0)):
        picked += [q[turn] for q in queues if turn < len(q)]
    return [items[i] for i in sorted(picked[:limit])]  # in the split list's order


def train_val_paths(dataset: Dataset, limit: int | None):
    """The train and val image paths and class indices (a ``limit`` of each when given, spread
    over the classes: :func:`spread`)."""
    train_items = dataset.items("train")
    val_items = dataset.items("val")
    if limit:
        train_items, val_items = spread(train_items, limit), spread(val_items, limit)
    # a split drawn here: its test images too (their headers), as a bad one found later could only
    # be removed, which would draw the split again and put trained-on images into the test split
    drawn = dataset.split_source.startswith("stratified") and "test" in dataset.splits
    dataset.check_found(train=train_items, val=val_items, **({"test": dataset.items("test")} if drawn else {}))
    tr_paths = [dataset.root / p for p, _ in train_items]
    va_paths = [dataset.root / p for p, _ in val_items]
    tr_y = np.array([c for _, c in train_items])
    va_y = np.array([c for _, c in val_items])
    for name, paths, why in (("train", tr_paths, "a chips dataset cut with --split test is for scoring only"),
                             ("val", va_paths, "training stops early and keeps its best epoch by the val chips: cut "
                                               "the chips again with a --val-fraction above 0")):
        if not paths:
            raise InputError(f"the dataset's {name} split is empty ({why})", path=str(dataset.root))
    return tr_paths, tr_y, va_paths, va_y


# ---------------------------------------------------------------------------- images


def decode_rgb(path: Path) -> np.ndarray:
    """Decode an image file to uint8 RGB (H, W, 3)."""
    cv2 = quiet_opencv()
    img = cv2.imread(str(path), cv2.IMREAD_COLOR | cv2.IMREAD_ANYDEPTH)
    if img is None:
        raise InputError("cannot decode image (missing, corrupt or unsupported)", path=str(path))
    if img.dtype != np.uint8:  # OpenCV's 8-bit read keeps a 16-bit value's high byte: 12-bit data go black
        raise InputError(f"a {img.dtype} image: {_MAKE_CHIPS}", path=str(path))
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def resize(img: np.ndarray, size: int) -> np.ndarray:
    import cv2

    h, w = img.shape[:2]
    if (h, w) == (size, size):
        return img
    interp = cv2.INTER_AREA if (h > size or w > size) else cv2.INTER_LINEAR
    return cv2.resize(img, (size, size), interpolation=interp)


def random_resized_crop(img: np.ndarray, size: int, scale: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    """A crop of random area fraction in ``scale`` and aspect ratio in [3/4, 4/3], resized."""
    h, w = img.shape[:2]
    area = h * w
    for _ in range(10):
        target = area * rng.uniform(*scale)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw = int(round(math.sqrt(target * ratio)))
        ch = int(round(math.sqrt(target / ratio)))
        if 0 < cw <= w and 0 < ch <= h:
            x0 = int(rng.integers(0, w - cw + 1))
            y0 = int(rng.integers(0, h - ch + 1))
            return resize(img[y0 : y0 + ch, x0 : x0 + cw], size)
    return resize(img, size)


def augment_batch(x: np.ndarray, rng: np.random.Generator, jitter: float) -> np.ndarray:
    """Dihedral flips/rotations and brightness/contrast/saturation jitter, in place-ish.

    All eight flips and 90° rotations are label-preserving for overhead imagery.
    """
    out = np.empty_like(x)
    k = rng.integers(0, 4, size=len(x))
    flip = rng.random(len(x)) < 0.5
    for i in range(len(x)):  # cheap views; the costly work (decode, resize) is per image anyway
        img = np.rot90(x[i], k[i])
        out[i] = img[:, ::-1] if flip[i] else img
    if jitter > 0:
        n = len(x)
        b = rng.uniform(1 - jitter, 1 + jitter, size=(n, 1, 1, 1)).astype(np.float32)
        c = rng.uniform(1 - jitter, 1 + jitter, size=(n, 1, 1, 1)).astype(np.float32)
        s = rng.uniform(1 - jitter, 1 + jitter, size=(n, 1, 1, 1)).astype(np.float32)
        out *= b
        mean = out.mean(axis=(1, 2, 3), keepdims=True)
        out = (out - mean) * c + mean
        gray = out.mean(axis=3, keepdims=True)
        out = (out - gray) * s + gray
        np.clip(out, 0.0, 1.0, out=out)
    return out


def load_eval_image(path: Path, size: int) -> np.ndarray:
    """The evaluation view of an image: the whole image resized to ``size``, float32 0..1."""
    return resize(decode_rgb(path), size).astype(np.float32) / 255.0


def make_batches(
    paths: Sequence[Path],
    labels: np.ndarray,
    num_classes: int,
    batch_size: int,
    size: int,
    augment: bool = False,
    shuffle: bool = False,
    seed: int = 0,
    crop_scale: tuple[float, float] = (0.6, 1.0),
    jitter: float = 0.2,
    workers: int = 2,
    one_hot: bool = True,
    start_epoch: int = 0,
):
    """A ``keras.utils.PyDataset`` streaming (x, y) batches; see :class:`ImageBatches`."""
    import keras

    class ImageBatches(keras.utils.PyDataset):
        """Decodes, augments and batches images in worker threads, one batch at a time.

        Each batch's randomness comes from ``(seed, epoch, batch index)``, so results do
        not depend on thread scheduling, and a resumed run sees the epochs it would have.
        """

        def __init__(self):
            super().__init__(workers=workers, use_multiprocessing=False, max_queue_size=max(2, 2 * workers))
            self.set_epoch(start_epoch)

        def set_epoch(self, epoch: int) -> None:  # fit()'s 0-based count; its on_epoch_end calls drift from it
            self.epoch = epoch
            self._order = self._permutation()

        def _permutation(self):
            if not shuffle:
                return np.arange(len(paths))
            return np.random.default_rng([seed, self.epoch]).permutation(len(paths))

        def __len__(self):
            return max(1, math.ceil(len(paths) / batch_size))

        def __getitem__(self, i):
            idx = self._order[i * batch_size : (i + 1) * batch_size]
            rng = np.random.default_rng([seed, self.epoch, i])
            imgs = []
            for j in idx:
                img = decode_rgb(paths[j])
                imgs.append(random_resized_crop(img, size, crop_scale, rng) if augment else resize(img, size))
            x = np.stack(imgs).astype(np.float32) / 255.0
            if augment:
                x = augment_batch(x, rng, jitter)
            y = labels[idx]
            if one_hot:
                y = np.eye(num_classes, dtype=np.float32)[y]
            return x, y

        def on_epoch_end(self):  # a caller that sets no epoch (evaluate) sees the next one
            self.set_epoch(self.epoch + 1)

    if len(paths) == 0:
        raise ConfigError("no images in this split")
    return ImageBatches()


def channel_stats(paths: Sequence[Path], size: int, limit: int = 512, seed: int = 0) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (0..1 scale) over a seeded sample of at most ``limit`` images."""
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(paths), size=min(limit, len(paths)), replace=False)
    acc = np.zeros(3)
    acc2 = np.zeros(3)
    n = 0
    for j in sorted(pick):
        x = load_eval_image(paths[j], size).reshape(-1, 3).astype(np.float64)
        acc += x.sum(0)
        acc2 += (x * x).sum(0)
        n += len(x)
    mean = acc / n
    std = np.sqrt(np.maximum(acc2 / n - mean * mean, 1e-8))
    return [float(v) for v in mean], [float(v) for v in std]
