"""Where tilescan writes inside an output folder, and the scene folder names.

``OUT`` holds one folder per scene (row bands of a sharded scene inside it as
``rows-AAAAA-BBBBB/``), tilescan's own files (``report.json``, ``report-shard-*.json``,
``collected/``) and its hidden bookkeeping (``.tilescan-staging/``, ``.tilescan-locks/``).
Scene names come from input (file names today, URLs and STAC ids later), so they are mapped
by :func:`folder_name` into a space that cannot reach any of tilescan's own names: never a
leading dot, never a reserved name, one path component that every common filesystem
(Linux, macOS, Windows) accepts, at most :data:`MAX_NAME_BYTES` bytes. Ordinary stems map
to themselves, so outputs of earlier versions keep resuming.

This module imports nothing heavy: ``tilescan collect`` uses it without the pipeline.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Sequence

MANIFEST = "run.json"
STAGING = ".tilescan-staging"
LOCKS = ".tilescan-locks"
COLLECTED = "collected"
COLLECT_LOCK = ".collect.lock"  # in LOCKS: held by a running collect
REPORT = "report.json"
#: How run.json, report.json and the STAC items write a time: UTC, to the second.
TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
#: How this tilescan computes a scene's results, in run.json: raised with every change that gives
#: other outputs for the same scene, settings and model (``benchmarks/same_outputs.py`` tells),
#: so a rerun does not keep an earlier release's as its own. Outputs without it count as 1.
RESULTS_VERSION = 3
#: What each results version changed, as the message refusing an earlier one's outputs says it.
RESULTS_CHANGES = {2: "a tile past the scene's edge is fed its data mirrored, not black",
                   3: "a scene stored south-up or east-left has its tiles turned north-up for the model"}


def results_version(manifest: dict) -> int:
    """The :data:`RESULTS_VERSION` of the release that wrote a run.json: 1 where it recorded none
    (releases before it) or an unreadable one."""
    v = manifest.get("results_version", 1)
    return v if isinstance(v, int) and not isinstance(v, bool) else 1


#: Bound of a scene folder name in UTF-8 bytes, collision suffix included; leaves room for
#: the derived names (``.rows-AAAAA-BBBBB.<name>.lock``, ``.old-<pid>.…``) under the
#: 255-byte limit of a file name on ext4, APFS, NTFS (255 UTF-16 units) and others.
MAX_NAME_BYTES = 200
#: Longest derived name: ``.old-<pid>.`` + ``.rows-<6 digits>-<6 digits>.`` + name + ``.lock``.
MAX_DERIVED_BYTES = 255

PART_RE = re.compile(r"rows-\d+-\d+")
# Names tilescan writes into OUT itself, compared case-insensitively (casefolded).
_RESERVED_RE = re.compile(r"report(-shard-.*)?\.json|collected")
# Windows device names: reserved with any extension ("CON.tif") and trailing spaces.
_DEVICES = ({"con", "prn", "aux", "nul", "conin$", "conout$", "clock$"}
            | {f"{p}{d}" for p in ("com", "lpt") for d in "0123456789\u00b9\u00b2\u00b3"})
_WINDOWS_FORBIDDEN = set('<>:"/\\|?*')
# and in a scene folder's name '%': QGIS opens a GeoPackage read-only through an SQLite URI in
# which GDAL (3.6 at least) escapes '?' and '#' but not '%', so "a%20b/tiles.gpkg" is looked for as "a b/";
# and '#', which starts a URI's fragment: collection.json's relative link to a scene's item.json
# pointed at another folder, and pystac does not read '%23' in a local path as '#'
_SCENE_FORBIDDEN = _WINDOWS_FORBIDDEN | {"%", "#"}


def read_json(path: str | os.PathLike) -> Any:
    """A JSON file of tilescan's as read (a manifest, a report, a checkpoint's state); None
    when it is missing or not JSON (being written, or not tilescan's)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def read_manifest(folder: Path) -> dict | None:
    """A unit folder's ``run.json`` as read (None when it is missing or not JSON)."""
    return read_json(Path(folder) / MANIFEST)


def is_output_folder(folder: Path) -> bool:
    """Whether ``folder`` is a unit's output folder that tilescan wrote (its ``run.json``
    says so): a folder search leaves such folders out, so an OUT inside an input folder is
    never read as scenes."""
    m = read_manifest(folder)
    return isinstance(m, dict) and "fingerprint" in m and "scene_info" in m


def report_name(shard: tuple[int, int]) -> str:
    """The invocation report's file name in OUT (one per shard of a sharded run)."""
    i, n = shard
    return REPORT if n == 1 else f"report-shard-{i:04d}-of-{n:04d}.json"


# ----------------------------------------------------------------------------- names


def _utf8(text: str) -> bytes:
    # file names that are not UTF-8 reach Python as lone surrogates: keep them hashable
    return text.encode("utf-8", "surrogatepass")


def _digest(text: str) -> str:
    return hashlib.sha1(_utf8(text)).hexdigest()


def _cut(text: str, limit: int) -> str:
    """The longest prefix of ``text`` of at most ``limit`` UTF-8 bytes (whole characters)."""
    raw = _utf8(text)
    if len(raw) <= limit:
        return text
    return raw[:limit].decode("utf-8", "ignore")


def with_tag(name: str, tag: str) -> str:
    """``name-tag``, ``name`` cut so the result stays within :data:`MAX_NAME_BYTES`."""
    return f"{_cut(name, MAX_NAME_BYTES - len(tag) - 1)}-{tag}"


def folder_name(stem: str, forbidden: set[str] = _SCENE_FORBIDDEN) -> str:
    """A scene's output folder name from its name (file stem, URL leaf, item id).

    NFC-normalised; control characters, lone surrogates, characters Windows or macOS
    forbid (``<>:"/\\|?*``), ``%`` and ``#`` (``forbidden``) become ``_``; a leading ``.`` and
    trailing ``.`` or spaces become ``_``; tilescan's own names (``report.json``,
    ``report-shard-*.json``, ``collected``) and Windows device names (``CON``, ``com1.x``…)
    get a ``_`` after them; longer than :data:`MAX_NAME_BYTES` bytes, it is cut and tagged
    with a hash of ``stem``.
    Ordinary names are returned unchanged, and ``folder_name(folder_name(s)) == folder_name(s)``.
    """
    name = unicodedata.normalize("NFC", stem)
    name = "".join("_" if c in forbidden or unicodedata.category(c) in ("Cc", "Cs", "Zl", "Zp") else c
                   for c in name) or "_"
    if name[0] == ".":
        name = "_" + name[1:]
    stripped = name.rstrip(". ")
    name = stripped + "_" * (len(name) - len(stripped))
    head = name.split(".", 1)[0].rstrip(" ")
    if head.casefold() in _DEVICES:
        name = f"{head}_{name[len(head):]}"
    if _RESERVED_RE.fullmatch(name.casefold()):
        name += "_"
    if len(_utf8(name)) > MAX_NAME_BYTES:
        name = with_tag(name, _digest(stem)[:8])
    return name


def class_folder_name(name: str) -> str:
    """The folder a class's chips go in (``images/<class>/``): :func:`folder_name` with ``/``
    and ``\\`` made ``_`` too (they would nest folders), and ``%`` kept (no GeoPackage goes there)."""
    return folder_name(name.replace("/", "_").replace("\\", "_"), _WINDOWS_FORBIDDEN)


def fold(name: str) -> str:
    """The key under which a case-insensitive filesystem (macOS, Windows) sees ``name``."""
    # upper() first: NTFS folds through upper case ("ı" is "I" there), casefold() alone does not
    return unicodedata.normalize("NFC", unicodedata.normalize("NFC", name).upper().casefold())


def _path_digest(path: Path) -> str:
    text = str(path.resolve())
    try:
        return hashlib.sha1(text.encode()).hexdigest()  # what tilescan <= 0.x used: keeps old names
    except UnicodeEncodeError:
        return _digest(text)


def scene_folder_names(scenes: Sequence[Path], holds: Callable[[str, Path], bool] | None = None) -> list[str]:
    """Output folder names of the scenes of one invocation, in order: :func:`folder_name`
    of each stem, plus ``-<hash of the resolved path>`` on the names that would coincide on
    a case-insensitive filesystem. Every shard of a run computes the same list. ``holds(name,
    scene)``: whether the output folder ``name`` already holds that scene's finished outputs;
    such a scene keeps its name when another of the same stem arrives later (a cron job's
    folder), and its tagged name when it is left alone with its stem (the other removed, or
    the scene run by itself), so it is not done again under a new one."""
    bases = [folder_name(s.stem) for s in scenes]
    names = list(bases)
    if holds is not None:
        seen = Counter(fold(n) for n in names)
        for i, n in enumerate(names):  # a stem of its own now, finished under its tag before: keeps the tag
            tagged = with_tag(bases[i], _path_digest(scenes[i])[:8])
            if seen[fold(n)] == 1 and holds(tagged, scenes[i]) and not holds(n, scenes[i]):
                names[i] = tagged
    kept: dict[str, int] = {}  # a name -> the one scene whose finished outputs are there: it keeps the name
    for width in (8, 16, 40):
        seen = Counter(fold(n) for n in names)
        for i, n in enumerate(names):  # also a tagged name that a newcomer's stem now takes (a-7b1dd898.tif)
            if holds is not None and seen[fold(n)] > 1 and fold(n) not in kept and holds(n, scenes[i]):
                kept[fold(n)] = i
        clash = [i for i, n in enumerate(names) if seen[fold(n)] > 1 and kept.get(fold(n)) != i]
        if not clash:
            return names
        for i in clash:
            names[i] = with_tag(bases[i], _path_digest(scenes[i])[:width])
    # the same resolved path twice (find_scenes never gives that): its position decides
    seen = Counter(fold(n) for n in names)
    return [with_tag(bases[i], f"{_path_digest(s)[:24]}{i}") if seen[fold(names[i])] > 1 else names[i]
            for i, s in enumerate(scenes)]


def legacy_folder_names(scenes: Sequence[Path]) -> list[str]:
    """The folder names tilescan gave before :func:`folder_name` existed (the bare stem,
    plus a path hash where stems were equal): to find and refuse such outputs clearly."""
    stems = Counter(s.stem for s in scenes)
    return [f"{s.stem}-{_path_digest(s)[:8]}" if stems[s.stem] > 1 else s.stem for s in scenes]


def is_safe_name(name: str) -> bool:
    """Whether ``name`` is a scene folder name :func:`folder_name` can produce (its checks)."""
    return (bool(name) and name == folder_name(name) and len(_utf8(name)) <= MAX_NAME_BYTES
            and not name.startswith(".") and "/" not in name and "\\" not in name and "\0" not in name)


def slot(name: str, part: str | None = None) -> str:
    """A unit's name inside ``.tilescan-staging/`` and ``.tilescan-locks/``: the scene
    folder name for a whole scene, ``.<part>.<name>`` for a row band (scene names never
    start with a dot, so the two kinds cannot meet)."""
    return name if part is None else f".{part}.{name}"


def unit_of_slot(entry: str) -> str | None:
    """The unit a :func:`slot` name stands for (``scene``, or ``scene/rows-…``); None for the
    staging area's other entries (collect's, an output parked aside)."""
    part, _, name = entry[1:].partition(".")
    if not entry.startswith("."):
        return entry
    return f"{name}/{part}" if PART_RE.fullmatch(part) and name else None


def is_collect_stage(entry: str) -> bool:
    """Whether a staging entry is the set a collect builds (``.collect-<pid>``)."""
    return entry.startswith(".collect-") and entry[len(".collect-"):].isdigit()


def staging_lock(entry: str) -> str | None:
    """The lock (its file name in ``.tilescan-locks/``) that whoever writes the staging entry
    ``entry`` holds: a unit's, for its folder and an old output parked aside from it;
    collect's, for its new set and the old one parked aside; None for anything else."""
    if entry.startswith(".old-"):  # aside_name's
        pid, _, entry = entry[len(".old-"):].partition(".")
        if not pid.isdigit():
            return None
    if entry == COLLECTED or is_collect_stage(entry):
        return COLLECT_LOCK
    return entry + ".lock" if unit_of_slot(entry) is not None else None


#: What tilescan writes in a unit's folder (and in OUT/collected): with their sidecars
#: (``labels.tif.aux.xml``, ``tiles.gpkg-journal``), the unit's ``<name>.qgs`` and row-band parts.
UNIT_FILES = frozenset({"labels.tif", "heatmap.tif", "tiles.parquet", "tiles.gpkg", "quicklook.png", MANIFEST,
                        "item.json", "labels.qml", "heatmap.qml", "tiles.qml"})
COLLECTED_FILES = frozenset({"tiles.parquet", "tiles.gpkg", "summary.csv", "summary.json", "collected.qgs", "tiles.qml",
                             "collection.json", "items.json"})  # the last two: outputs.stac_items.write_collection


def carry_over(old: Path, new: Path, ours: frozenset[str], project: str | None = None) -> list[str]:
    """Move what a user added to a folder tilescan replaces (an entry that is none of ``ours``,
    their sidecars, ``project``, a row-band part or hidden) from ``old`` into ``new``, unless
    ``new`` has one of that name; returns their names."""
    kept = []
    for entry in sorted(old.iterdir()):
        n = entry.name
        if (n.startswith(".") or n == project or PART_RE.fullmatch(n) or os.path.lexists(new / n)
                or any(n == f or n.startswith((f + ".", f + "-")) for f in ours)):
            continue
        os.replace(entry, new / n)
        kept.append(n)
    return kept


def aside_name(entry: str) -> str:
    """Where an old output is parked in ``.tilescan-staging/`` while its replacement moves in."""
    return f".old-{os.getpid()}.{entry}"


# ----------------------------------------------------------------------------- filesystem


def discard(path: Path) -> None:
    """Remove ``path``: a real folder with its contents, anything else (file, link) itself."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def tidy(out: Path) -> None:
    """Remove ``OUT/.tilescan-staging`` and ``OUT/.tilescan-locks`` when they are empty (a
    folder another process is using is not empty, and rmdir never removes contents)."""
    for d in (STAGING, LOCKS):
        try:
            os.rmdir(out / d)
        except OSError:
            pass


def lock_holder() -> str:
    """What a lock this process takes says of its holder (in messages of those it turns away)."""
    return f"pid {os.getpid()} on {os.uname().nodename}"


class Busy(Exception):
    """The lock is held by another process; ``holder`` is what it wrote into the lock file."""

    def __init__(self, holder: str):
        super().__init__(holder)
        self.holder = holder


def _open_lock_file(path: Path) -> int:
    """A lock file's descriptor: made readable and writable as the umask allows (a shared
    group folder's umask 002 lets the group take it), or opened read-only where it is another
    user's that this one may not write (flock needs no write access; :class:`FileLock` then
    replaces it by one of its own where the folder lets it, else holds it without its name)."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:
        return os.open(path, os.O_RDONLY)


def _unlinked(path: Path) -> bool:
    try:
        os.unlink(path)
        return True
    except OSError:
        return False


class FileLock:
    """An exclusive, non-blocking ``flock`` on ``path``; the file is removed on release.

    The file is unlinked while the lock is still held, and a process that took the lock on a
    file that is no longer the one at ``path`` (it was removed meanwhile) tries again on the
    new one, so two processes never both think they hold it."""

    def __init__(self, path: Path):
        self.path = path
        self.fd: int | None = None

    def acquire(self) -> None:
        for _ in range(1000):
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = _open_lock_file(self.path)
            except FileNotFoundError:  # the folder was tidied away just now
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
                os.close(fd)
                raise Busy(holder) from None
            except OSError:
                os.close(fd)
                raise
            try:
                current = os.stat(self.path)
            except FileNotFoundError:
                current = None
            mine = os.fstat(fd)
            if current is not None and (current.st_ino, current.st_dev) == (mine.st_ino, mine.st_dev):
                if not os.access(self.path, os.W_OK) and _unlinked(self.path):
                    os.close(fd)  # another user's, held by none (a killed run's): a file of this run's instead,
                    continue  # whose holder line says who holds it now
                self.fd = fd
                try:  # who holds it, for the message of a process it turns away; a full disk leaves it blank
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, lock_holder().encode(), 0)
                except OSError:
                    pass
                return
            os.close(fd)  # the holder removed this file as it let go: lock the new one
        raise OSError(errno.EAGAIN, "could not take the lock (its file keeps changing)", str(self.path))

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            st, mine = os.stat(self.path), os.fstat(self.fd)
            if (st.st_ino, st.st_dev) == (mine.st_ino, mine.st_dev):
                os.unlink(self.path)
        except OSError:
            pass
        finally:
            os.close(self.fd)  # closing drops the flock
            self.fd = None
