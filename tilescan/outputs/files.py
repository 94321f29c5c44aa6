"""Atomic file output (temp file, fsync, rename) and the JSON/CSV/text writers built on it.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime as _dt
import errno
import io
import json
import math
import os
import secrets
import shutil
import sys
import threading
from glob import escape as glob_escape
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from ..errors import OutputError

# --------------------------------------------------------------------------- atomic files


def _io_error_types() -> tuple[type[BaseException], ...]:
    """Exception types that mean "the write failed" rather than "the caller has a bug"."""
    types: list[type[BaseException]] = [OSError]  # includes RasterioIOError, ArrowIOError
    try:  # GDAL errors raised by rasterio while writing blocks (private module, so guarded)
        from rasterio import _err

        types += [_err.CPLE_FileIOError, _err.CPLE_OpenFailedError, _err.CPLE_NoWriteAccessError,
                  # libtiff's write errors (a full disk, a file-size limit) arrive as
                  # "AppDefined", and a failed GDAL copy without a message as SystemError
                  _err.CPLE_AppDefinedError, SystemError]
    except (ImportError, AttributeError):  # pragma: no cover - depends on rasterio build
        pass
    import sqlite3

    types.append(sqlite3.OperationalError)  # a GeoPackage written with sqlite3: disk full, I/O error
    # pyogrio's errors only where it is loaded (only then can they be raised): importing it
    # here would load it, and geopandas and pandas where installed, for every first write
    pe = sys.modules.get("pyogrio.errors")
    if pe is not None:
        types += [pe.DataSourceError, pe.DataLayerError]
    return tuple(types)


def _space_hint(folder: Path | None) -> str:
    """"; disk full: ..." / "; file-size limit ..." when the likely cause of a failed write is
    a full file system or the process's ``ulimit -f`` (GDAL's own messages rarely say)."""
    hints = []
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if soft != resource.RLIM_INFINITY:
            hints.append(f"the process file-size limit (ulimit -f) is {soft} bytes")
    except (ImportError, OSError, ValueError):  # pragma: no cover - not on every platform
        pass
    if folder is not None:
        with contextlib.suppress(OSError):
            free = shutil.disk_usage(folder).free
            if free < 64 * 2**20:
                hints.append(f"disk full? only {free / 2**20:.1f} MiB free in {folder}")
    return "; " + "; ".join(hints) if hints else ""


def _describe(exc: BaseException, path: str | os.PathLike | None = None) -> str:
    """"cannot write (<reason>)", then a hint about space or limits for write failures."""
    folder = Path(path).parent if path is not None else None
    if isinstance(exc, OSError) and exc.strerror:
        hint = _space_hint(folder) if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT) else ""
        return f"cannot write ({exc.strerror}){hint}"
    text = str(exc).strip() or type(exc).__name__
    return f"cannot write ({text}){_space_hint(folder)}"


def write_error(exc: OSError, path: str | os.PathLike) -> OutputError:
    """An OS error writing ``path`` as the :class:`OutputError` that names it: "cannot write
    (<reason>)", with the free space where the disk is full."""
    return OutputError(_describe(exc, path), path=str(path))


def _temp_name(path: Path, tag: str = "tmp") -> Path:
    # Hidden, unique, in the same folder (so os.replace is a rename on one file system);
    # the final suffix is kept at the end so drivers that look at the extension still
    # recognise the format (GDAL's GPKG driver warns on any other extension).
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}{path.suffix}")


_SIDECARS = ("", ".aux.xml", "-journal", "-wal", "-shm", ".ovr")


def remove_dead_temps(path: Path, older_than_s: float = 600) -> None:
    """Remove the temporary files (or folders) of ``path`` (:func:`_temp_name`) that a process no longer
    running left (killed while writing it): no one else removes them. Only those untouched for
    ``older_than_s`` seconds: on a shared file system the pid may be another machine's, at work."""
    import time

    for tmp in path.parent.glob(f".{glob_escape(path.name)}.tmp-*"):
        pid = tmp.name[len(path.name) + 6:].split("-", 1)[0]
        try:
            if not pid.isdigit() or time.time() - tmp.stat().st_mtime < older_than_s:
                continue
            os.kill(int(pid), 0)
        except ProcessLookupError:
            _remove_quietly(tmp)
        except OSError:
            pass  # alive (another user's), or gone meanwhile


def _remove_quietly(path: Path) -> None:
    """A temporary file and its sidecars, or a staged set's folder (:func:`staged_files`)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
        return
    for extra in _SIDECARS:
        with contextlib.suppress(OSError):
            os.remove(str(path) + extra)


@contextlib.contextmanager
def staged_files(folder: Path, name: str, last: str | None = None, own: Sequence[str] = ()) -> Iterator[Path]:
    """A new hidden folder in ``folder`` (:func:`_temp_name` of ``name``) to make a command's
    set of files in, moved into ``folder`` once all are made (``last`` after the others), and
    the files of ``own`` (the names a set may hold) it did not make removed: a stop or an error
    before leaves what ``folder`` held as it was. A stop signal during the moves waits, and once
    they are done the command's work is in place (:func:`tilescan.stop.settle`: such a stop
    lets it end as done). A killed process's folder is removed by a later one
    (:func:`remove_dead_temps`)."""
    from .. import stop

    remove_dead_temps(Path(folder) / name)
    stage = _temp_name(Path(folder) / name)
    stage.mkdir()
    try:
        yield stage
        with stop.deferred():
            made = sorted(stage.iterdir(), key=lambda f: f.name == last)
            for f in made:
                os.replace(f, Path(folder) / f.name)
            for gone in set(own) - {f.name for f in made}:  # an earlier set's, this one has none of
                (Path(folder) / gone).unlink(missing_ok=True)
            stop.settle()
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not possible everywhere (e.g. Windows): best effort
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


_one_sync: set[str] = set()  # folders whose fsync after each rename into them waits for :func:`folder_synced_once`
_one_sync_lock = threading.Lock()


@contextlib.contextmanager
def folder_synced_once(folder: str | os.PathLike) -> Iterator[None]:
    """Within the block, :func:`atomic_output` does not fsync ``folder`` after each file it
    renames into it (on any thread); the folder is fsync'ed once when the block ends without
    an error. For a staging folder whose files only count once the folder itself is renamed
    into place: each of its renames is then on disk before that."""
    key = os.path.abspath(folder)
    with _one_sync_lock:
        _one_sync.add(key)
    try:
        yield
    finally:
        with _one_sync_lock:
            _one_sync.discard(key)
    _fsync_dir(Path(folder))


def make_folder(path: str | os.PathLike) -> Path:
    """``path`` as a folder, made with its parents; an :class:`OutputError` naming it, with the
    cause in words, when it cannot be (a file in its way, no permission, a read-only disk)."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputError("output path exists and is not a folder", path=str(out)) from None
    except OSError as exc:
        raise OutputError(f"cannot create the output folder: {exc.strerror or exc}", path=str(out)) from None
    return out


@contextlib.contextmanager
def folder_kept_if_used(path: str | os.PathLike) -> Iterator[Path]:
    """:func:`make_folder` now (an unusable path fails before any work); the folders it made
    are removed again when the block ends in an error or a stop (Ctrl-C) before anything was
    written into them, so a stopped command leaves no empty output folder behind."""
    out = Path(path)
    made = [p for p in (out, *out.parents) if not p.exists()]  # deepest first
    folder = make_folder(out)
    try:
        yield folder
    except BaseException:
        for p in made:
            try:
                p.rmdir()
            except OSError:  # not empty (something was written), or not ours any more
                break
        raise


def probe_folder(final: str | os.PathLike, tmp: Path | None = None) -> None:
    """Reserve and release a temporary name beside ``final``, proving its folder exists and
    is writable; else :class:`OutputError` naming ``final``. Fails fast, before any work."""
    final = Path(final)
    tmp = tmp if tmp is not None else _temp_name(final)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.close(fd)
        os.remove(tmp)
    except OSError as exc:
        raise OutputError(_describe(exc, final), path=str(final)) from exc


def as_files_are_made(path: Path) -> None:
    """Give a file SQLite created (mode 0644 whatever the umask) the mode open() gives new files
    here, 0666 less the umask: group-writable in a shared folder (umask 002) as the other
    outputs are. The umask is read from /proc (setting it to read it would race other threads
    making files); left as it is where /proc does not say."""
    try:
        with open("/proc/self/status") as f:
            umask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
        os.chmod(path, 0o666 & ~umask)
    except (OSError, StopIteration, ValueError, IndexError):
        pass


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it to ``path``.

    The temporary file is ``.{name}.tmp-<pid>-<random>{suffix}`` in the same folder. When the
    ``with`` body finishes, the file is fsync'ed and ``os.replace``d over ``path``, and the
    folder is fsync'ed (unless :func:`folder_synced_once` leaves that for later). When the
    body raises, the temporary file (and any GDAL/SQLite sidecar of it) is removed and
    nothing appears at ``path``.

    Write failures -- :class:`OSError` (ENOSPC, EFBIG, EACCES, ENOTDIR...) and GDAL/pyogrio
    file errors -- become :class:`OutputError` naming ``path``. The folder is probed before
    the body runs, so an unwritable destination fails fast, before any work is done (not a
    folder within :func:`folder_synced_once`: a staging folder the run has just made).
    """
    final = Path(path)
    tmp = _temp_name(final)
    staged = os.path.abspath(final.parent) in _one_sync  # a staging folder, made by this run
    if not staged:
        probe_folder(final, tmp)
    try:
        yield tmp
        if not tmp.exists():
            raise OutputError("cannot write (the writer produced no file)", path=str(final))
        if fsync:
            _fsync_path(tmp)
        os.replace(tmp, final)
        if fsync and not staged:
            _fsync_dir(final.parent)
    except OutputError:
        _remove_quietly(tmp)
        raise
    except _io_error_types() as exc:  # evaluated when raised: the body may have loaded pyogrio
        _remove_quietly(tmp)
        raise OutputError(_describe(exc, final), path=str(final)) from exc
    except BaseException:
        _remove_quietly(tmp)
        raise
    finally:
        # GDAL may leave a PAM sidecar for the temporary name; it never belongs to the output.
        with contextlib.suppress(OSError):
            os.remove(str(tmp) + ".aux.xml")


# --------------------------------------------------------------------------- JSON


def nodata_json(value: float | None) -> float | str | None:
    """A nodata value as JSON holds it: NaN and the infinities, which JSON lacks, as the text GDAL
    writes them ("nan", "inf", "-inf"); None (no nodata) stays null. :func:`nodata_read` reverses it."""
    if value is None or math.isfinite(value):
        return value
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")


def nodata_read(value: float | str | None) -> float | None:
    """A nodata value read back from JSON (:func:`nodata_json`)."""
    return None if value is None else float(value)


def _jsonable(obj: Any) -> Any:
    """Convert numpy scalars/arrays, paths, dates, sets and dataclasses to JSON types;
    non-finite floats become ``null`` so the output is strict JSON."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted((_jsonable(v) for v in obj), key=repr)
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (_dt.datetime, _dt.date)):
        return obj.isoformat()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(dataclasses.asdict(obj))
    if hasattr(obj, "to_wkt") and hasattr(obj, "to_string"):  # a rasterio or pyproj CRS
        return obj.to_string()
    raise TypeError(f"cannot write {type(obj).__name__} as JSON: {obj!r}")


def _dumps(obj: Any, indent: int | None = None) -> str:
    try:  # the common case: only the values JSON lacks are converted, no walk over the rest
        return json.dumps(obj, indent=indent, allow_nan=False, ensure_ascii=False, default=_json_default)
    except (TypeError, ValueError):  # non-finite floats (to null), odd keys: the full conversion
        return json.dumps(_jsonable(obj), indent=indent, allow_nan=False, ensure_ascii=False)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (Mapping, list, tuple)):  # e.g. a mapping proxy: convert it whole
        return _jsonable(obj)
    got = _jsonable(obj)
    if isinstance(got, float) or got is None:  # a value that may need the non-finite rule: the slow path
        raise ValueError("float from a non-JSON type")
    return got


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` atomically (its folder is created if missing)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` as UTF-8, atomically."""
    return write_bytes(path, text.encode("utf-8"))


def csv_text(rows: Iterable[Sequence[Any]]) -> str:
    """CSV (``\n`` line ends) of ``rows``, the first being the header; a text cell a spreadsheet
    would run as a formula (a class named ``=HYPERLINK(...)`` in a model or dataset) starts with
    ``'``, which spreadsheets show as text."""
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([_as_text(c) for c in row] for row in rows)
    return buf.getvalue()


def _as_text(cell: Any) -> Any:
    if isinstance(cell, str) and cell[:1] in ("=", "+", "-", "@", "\t", "\r"):
        try:
            float(cell)  # a number written as text ("-0.5") is one
        except ValueError:
            return "'" + cell
    return cell


def write_json_in_place(path: str | os.PathLike, obj: Any) -> bool:
    """Write ``obj`` as compact JSON over the existing file at ``path``, in place, when it fits
    in the blocks that file already holds: on a full disk, where :func:`write_json` cannot make
    its temporary file, the last word still reaches a file it once wrote. False when it cannot."""
    text = _dumps(obj).encode("utf-8", "backslashreplace")
    try:
        with open(path, "r+b") as fh:
            if len(text) > os.fstat(fh.fileno()).st_blocks * 512:  # past them it would need a new block
                return False
            fh.write(text)
            fh.truncate()
            os.fsync(fh.fileno())
        return True
    except OSError:
        return False


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented, strict JSON (numpy values converted), atomically."""
    text = _dumps(obj, indent=2) + "\n"  # convert first: a TypeError leaves no file at all
    with atomic_output(path) as tmp:
        # a file name that is not valid UTF-8 arrives as lone surrogates: written as JSON \u escapes
        with open(tmp, "w", encoding="utf-8", errors="backslashreplace") as fh:
            fh.write(text)
    return Path(path)
