"""GeoPackage files that older GDAL and QGIS read fully: version 1.2 and an R-tree index.

GDAL >= 3.8 writes GeoPackage 1.4 by default, which GDAL 3.6 (Debian 12's QGIS 3.22) opens
with a "may only be partially supported" warning; the 1.2 metadata (GDAL's ``VERSION=1.2``
creation option, :data:`DATASET_OPTIONS`) is read by every GDAL since 2.2.

The spatial index is added here instead of by GDAL: inside ``tilescan run`` TensorFlow is
loaded with global symbols, and its SQLite build (without the R-tree module) then serves
SQLite users in the process that bind to it later, GDAL's too, so GDAL's own index step
fails with "no such module: rtree" (printed) and leaves the file without an index. The
tile tables turn GDAL's index off and :func:`add_rtree` builds the index the GeoPackage spec
describes (the ``gpkg_rtree_index`` extension with the 1.2 triggers, as GDAL writes them for
``VERSION=1.2``) with Python's ``sqlite3``: in this process when its SQLite has the R-tree
module (Python's ``sqlite3`` loaded before TensorFlow keeps its own), else in a short child
process that has not loaded TensorFlow. :func:`layer_options` lets GDAL index where no
TensorFlow is loaded (``tilescan collect``).

Each file of a run is then a copy of an empty layer so written (once per process, CRS and
columns), filled by :func:`fill_copy` with Python's ``sqlite3`` as GDAL would fill it: no
R-tree module or GDAL set-up is needed per file.

Standard library only, but numpy to fill an index (imported then), so ``python -m
tilescan.outputs.gpkg FILE`` starts fast.
"""

from __future__ import annotations

import atexit
import importlib
import os
import sqlite3
import struct
import subprocess
import sys
import threading
import warnings
from pathlib import Path
from typing import Mapping, Sequence

__all__ = ["DATASET_OPTIONS", "add_rtree", "fill_copy", "has_rtree", "layer_options"]

DATASET_OPTIONS = {"VERSION": "1.2"}
"""GDAL GPKG dataset creation options for files every GDAL >= 2.2 reads without warnings."""


def layer_options() -> dict[str, str]:
    """GDAL GPKG layer creation options: GDAL's own (fast, bulk-loaded) R-tree when this
    process's SQLite has the module and TensorFlow is not loaded (whose SQLite GDAL may then
    use, see the module doc), else none, for :func:`add_rtree` to add afterwards (GDAL's
    attempt would fail with an error message: ``tilescan.collect()`` after a run in a notebook)."""
    return {"SPATIAL_INDEX": "YES" if _sqlite_has_rtree() and "tensorflow" not in sys.modules else "NO"}

_RTREE_EXT = "http://www.geopackage.org/spec120/#extension_rtree"
_NO_RTREE = 3  # exit code of ``python -m tilescan.outputs.gpkg`` when its SQLite lacks the R-tree module


def _q(name: str) -> str:
    """An SQL identifier in double quotes."""
    return '"' + name.replace('"', '""') + '"'


def _sqlite_has_rtree() -> bool:
    """Whether this process's SQLite has the R-tree module (checked each time: loading
    TensorFlow later can change the answer)."""
    try:
        con = sqlite3.connect(":memory:")
        try:
            con.execute("CREATE VIRTUAL TABLE t USING rtree(id, a, b)")
        finally:
            con.close()
        return True
    except sqlite3.Error:
        return False


def _envelope(blob: bytes) -> tuple[float, float, float, float] | None:
    """(minx, maxx, miny, maxy) from a GeoPackage geometry blob's header; None if empty."""
    if blob[:2] != b"GP":
        raise ValueError("not a GeoPackage geometry blob")
    flags = blob[3]
    if flags & 0x10:  # the empty-geometry flag
        return None
    if not (flags >> 1) & 0x07:
        raise ValueError("geometry blob without an envelope")
    return struct.unpack_from("<4d" if flags & 1 else ">4d", blob, 8)


def _triggers(t: str, g: str, fid: str) -> list[str]:
    """The GeoPackage 1.2 R-tree triggers for table ``t``, geometry column ``g``."""
    r = _q(f"rtree_{t}_{g}")
    T, G, I = _q(t), _q(g), _q(fid)
    values = f"VALUES (NEW.{I}, ST_MinX(NEW.{G}), ST_MaxX(NEW.{G}), ST_MinY(NEW.{G}), ST_MaxY(NEW.{G}))"
    name = lambda s: _q(f"rtree_{t}_{g}_{s}")  # noqa: E731
    return [
        f"CREATE TRIGGER {name('insert')} AFTER INSERT ON {T} WHEN (NEW.{G} NOT NULL AND NOT ST_IsEmpty(NEW.{G})) "
        f"BEGIN INSERT OR REPLACE INTO {r} {values}; END",
        f"CREATE TRIGGER {name('update1')} AFTER UPDATE OF {G} ON {T} WHEN OLD.{I} = NEW.{I} AND "
        f"(NEW.{G} NOTNULL AND NOT ST_IsEmpty(NEW.{G})) BEGIN INSERT OR REPLACE INTO {r} {values}; END",
        f"CREATE TRIGGER {name('update2')} AFTER UPDATE OF {G} ON {T} WHEN OLD.{I} = NEW.{I} AND "
        f"(NEW.{G} ISNULL OR ST_IsEmpty(NEW.{G})) BEGIN DELETE FROM {r} WHERE id = OLD.{I}; END",
        f"CREATE TRIGGER {name('update3')} AFTER UPDATE ON {T} WHEN OLD.{I} != NEW.{I} AND "
        f"(NEW.{G} NOTNULL AND NOT ST_IsEmpty(NEW.{G})) BEGIN DELETE FROM {r} WHERE id = OLD.{I}; "
        f"INSERT OR REPLACE INTO {r} {values}; END",
        f"CREATE TRIGGER {name('update4')} AFTER UPDATE ON {T} WHEN OLD.{I} != NEW.{I} AND "
        f"(NEW.{G} ISNULL OR ST_IsEmpty(NEW.{G})) BEGIN DELETE FROM {r} WHERE id IN (OLD.{I}, NEW.{I}); END",
        f"CREATE TRIGGER {name('delete')} AFTER DELETE ON {T} WHEN OLD.{G} NOT NULL "
        f"BEGIN DELETE FROM {r} WHERE id = OLD.{I}; END",
    ]


def _fid_column(con: sqlite3.Connection, table: str) -> str:
    for _, name, _, _, _, pk in con.execute(f"PRAGMA table_info({_q(table)})"):
        if pk:
            return name
    raise ValueError(f"table {table!r} has no integer primary key")


def _f32_boxes(boxes: Sequence[tuple]):
    """(minx, maxx, miny, maxy) boxes as an (n, 4) float32 array, each value rounded outwards
    (a lower bound to the nearest float32 at or below it, an upper bound at or above it)."""
    import numpy as np

    x = np.asarray(boxes, np.float64).reshape(-1, 4)
    with np.errstate(over="ignore"):
        f = x.astype(np.float32)
    up = np.array([False, True, False, True])
    low = ~up & (f > x)  # a lower bound rounded up: one float32 step down, and the reverse
    high = up & (f < x)
    f[low] = np.nextafter(f[low], np.float32(-np.inf))
    f[high] = np.nextafter(f[high], np.float32(np.inf))
    return f


#: One R-tree cell as SQLite stores it: a big-endian int64 id and four big-endian float32.
_CELL = [("id", ">i8"), ("box", ">f4", (4,))]


def _pack_rtree(con: sqlite3.Connection, rtree: str, ids: Sequence[int], boxes: Sequence[tuple]) -> None:
    """Fill the new, empty SQLite R-tree ``rtree`` with the (minx, maxx, miny, maxy) boxes
    of rows ``ids`` by writing its node, parent and rowid tables directly, packed bottom-up
    in sort-tile-recursive order (as GDAL's bulk loader does): several times faster than one
    INSERT per row, and a tree SQLite's ``rtreecheck`` accepts.

    The layout is SQLite's (ext/rtree): nodes of a fixed size (that of the root node the
    CREATE VIRTUAL TABLE wrote), a 4-byte header (tree depth, in the root only; cell count)
    and cells of a big-endian int64 id and four big-endian float32 coordinates, rounded
    outwards. Node 1 is the root. Each level is built with numpy, a node's bytes sliced from
    the level's cells."""
    import math

    import numpy as np

    n = len(ids)
    if n == 0:
        return
    size = con.execute(f"SELECT length(data) FROM {_q(rtree + '_node')} WHERE nodeno = 1").fetchone()[0]
    per = (size - 4) // 24  # cells per node
    cells = np.empty(n, _CELL)
    cells["id"] = np.asarray(ids, np.int64)
    cells["box"] = _f32_boxes(boxes)
    # sort-tile-recursive: vertical slices by x centre, each sorted by y centre (both stable)
    step = max(1, math.ceil(math.sqrt(-(-n // per)))) * per
    b = cells["box"].astype(np.float64)
    order = np.argsort(b[:, 0] + b[:, 1], kind="stable")
    order = order[np.lexsort((b[order, 2] + b[order, 3], np.arange(n) // step))]
    level = cells[order]
    node_rows, parent_rows, rowid_rows = [], [], []
    next_no, depth = 2, 0

    def blob(head: int, kids: bytes) -> bytes:
        return struct.pack(">HH", head, len(kids) // 24) + kids + bytes(size - 4 - len(kids))

    while len(level) > per:
        m = len(level)
        starts = np.arange(0, m, per)
        nos = np.arange(next_no, next_no + len(starts))
        next_no += len(starts)
        raw = level.tobytes()
        node_rows += [(int(no), blob(0, raw[a * 24:(a + per) * 24])) for no, a in zip(nos, starts)]
        (rowid_rows if depth == 0 else parent_rows).extend(zip(level["id"].tolist(), np.repeat(nos, per)[:m].tolist()))
        box = level["box"]
        up = np.empty(len(starts), _CELL)
        up["id"] = nos
        up["box"] = np.stack([np.minimum.reduceat(box[:, 0], starts), np.maximum.reduceat(box[:, 1], starts),
                              np.minimum.reduceat(box[:, 2], starts), np.maximum.reduceat(box[:, 3], starts)], axis=1)
        level, depth = up, depth + 1
    node_rows.append((1, blob(depth, level.tobytes())))
    (rowid_rows if depth == 0 else parent_rows).extend((i, 1) for i in level["id"].tolist())
    cur = con.cursor()
    cur.executemany(f"INSERT OR REPLACE INTO {_q(rtree + '_node')} (nodeno, data) VALUES (?, ?)", node_rows)
    cur.executemany(f"INSERT INTO {_q(rtree + '_parent')} (nodeno, parentnode) VALUES (?, ?)", parent_rows)
    cur.executemany(f"INSERT INTO {_q(rtree + '_rowid')} (rowid, nodeno) VALUES (?, ?)", rowid_rows)


def _index_in_process(path: Path) -> int:
    """Add the R-tree to every feature table of ``path`` that has none; the number added."""
    con = sqlite3.connect(str(path), isolation_level=None)
    try:
        con.execute("BEGIN")
        con.execute("CREATE TABLE IF NOT EXISTS gpkg_extensions (table_name TEXT, column_name TEXT, "
                    "extension_name TEXT NOT NULL, definition TEXT NOT NULL, scope TEXT NOT NULL, "
                    "CONSTRAINT ge_tce UNIQUE (table_name, column_name, extension_name))")
        done = 0
        for table, geom in con.execute("SELECT table_name, column_name FROM gpkg_geometry_columns").fetchall():
            rtree = f"rtree_{table}_{geom}"
            if con.execute("SELECT 1 FROM sqlite_master WHERE name = ?", (rtree,)).fetchone():
                continue
            fid = _fid_column(con, table)
            con.execute(f"CREATE VIRTUAL TABLE {_q(rtree)} USING rtree(id, minx, maxx, miny, maxy)")
            rows = con.execute(f"SELECT {_q(fid)}, {_q(geom)} FROM {_q(table)} WHERE {_q(geom)} IS NOT NULL")
            ids, boxes = [], []
            for i, b in rows:
                e = _envelope(b)
                if e is not None:
                    ids.append(i)
                    boxes.append(e)
            _pack_rtree(con, rtree, ids, boxes)
            for sql in _triggers(table, geom, fid):
                con.execute(sql)
            con.execute("INSERT OR REPLACE INTO gpkg_extensions VALUES (?, ?, 'gpkg_rtree_index', ?, 'write-only')",
                        (table, geom, _RTREE_EXT))
            done += 1
        con.execute("COMMIT")
        return done
    except BaseException:
        if con.in_transaction:
            con.execute("ROLLBACK")
        raise
    finally:
        con.close()


def add_rtree(path: str | os.PathLike, name: str | os.PathLike | None = None) -> None:
    """Give every feature table of the GeoPackage ``path`` the spec's R-tree spatial index
    (skipping tables that have one, e.g. from GDAL). Raises :class:`~tilescan.errors.OutputError`
    naming ``name`` (default ``path``; e.g. the final name of a temporary file) when the file
    cannot be indexed (full disk, not a GeoPackage...); when no SQLite at hand has the R-tree
    module, warns and leaves the (valid) file without one."""
    name = str(name if name is not None else path)
    why = try_rtree(path, name)
    if why is not None:
        warnings.warn(f"{name}: written without a spatial index: {why}", stacklevel=2)


def try_rtree(path: str | os.PathLike, name: str | os.PathLike | None = None) -> str | None:
    """:func:`add_rtree` without the warning: None when ``path`` has its index, else why no
    SQLite at hand could build it."""
    from ..errors import OutputError

    path = Path(path)
    name = str(name if name is not None else path)
    try:
        if has_rtree(path):
            return None
        if _sqlite_has_rtree():
            _index_in_process(path)
            return None
    except (sqlite3.Error, ValueError) as exc:
        raise OutputError(f"cannot add the GeoPackage spatial index ({exc})", path=name) from exc
    # This process's SQLite lacks the R-tree module: a helper interpreter without TensorFlow,
    # started once and kept for the process's later files (a start per file cost more than
    # the index).
    code, why = _helper.index(path)
    if code == _NO_RTREE:  # no SQLite here can build it: a file without an index
        return why
    if code != 0:
        raise OutputError(f"cannot add the GeoPackage spatial index ({why})", path=name)
    return None


def _xml_text(text: str) -> str:
    """``text`` escaped as GDAL writes an element's text in its metadata XML."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def fill_copy(template: str | os.PathLike, dest: str | os.PathLike, columns: Mapping[str, Sequence],
              geometry: Sequence[bytes], boxes: Sequence[tuple], metadata: tuple[str, str] | None = None) -> None:
    """Write ``dest``: a copy of the GeoPackage ``template`` (one empty feature table, as GDAL
    made it, with its R-tree if it has one) with rows added, as GDAL would have added them.

    ``columns`` holds the values of each of the table's columns but its fid and geometry (by
    name); ``geometry`` the rows' GeoPackage geometry blobs, ``boxes`` their
    (minx, maxx, miny, maxy). The R-tree is packed from the boxes
    (:func:`_pack_rtree`) with its triggers set aside meanwhile (they call GDAL's SQL
    functions), so Python's ``sqlite3`` does it all, with or without the R-tree module and
    without GDAL's per-file set-up. The table's extent, change time, feature count and
    metadata time are updated as GDAL updates them; ``metadata`` ``(marker, text)`` replaces
    ``marker`` in the template's metadata XML by ``text``."""
    import shutil

    shutil.copyfile(template, dest)
    con = sqlite3.connect(str(dest), isolation_level=None)
    try:
        # a new temporary file that is fsync'ed and renamed by the caller, removed on failure
        con.execute("PRAGMA journal_mode = OFF")
        con.execute("PRAGMA synchronous = OFF")
        con.execute("BEGIN")
        (table, geom), = con.execute("SELECT table_name, column_name FROM gpkg_geometry_columns").fetchall()
        rtree = f"rtree_{table}_{geom}"
        indexed = con.execute("SELECT 1 FROM sqlite_master WHERE name = ?", (rtree,)).fetchone() is not None
        triggers = [(n, sql) for n, sql in con.execute("SELECT name, sql FROM sqlite_master WHERE type = 'trigger' "
                                                       "AND tbl_name = ?", (table,)) if n.startswith(rtree + "_")]
        for name, _ in triggers:
            con.execute(f"DROP TRIGGER {_q(name)}")
        fid = _fid_column(con, table)
        cols = [r[1] for r in con.execute(f"PRAGMA table_info({_q(table)})") if r[1] != fid]
        rows = list(zip(*(geometry if c == geom else columns[c] for c in cols)))
        if rows:
            con.executemany(f"INSERT INTO {_q(table)} ({', '.join(map(_q, cols))}) VALUES "
                            f"({', '.join('?' * len(cols))})", rows)
            if indexed:
                ids = [i for (i,) in con.execute(f"SELECT {_q(fid)} FROM {_q(table)} ORDER BY {_q(fid)}")]
                _pack_rtree(con, rtree, ids, boxes)
            extent = (min(b[0] for b in boxes), max(b[1] for b in boxes), min(b[2] for b in boxes),
                      max(b[3] for b in boxes))
            # GDAL writes the extent through SQLite's printf, which keeps 16 significant digits
            con.execute("UPDATE gpkg_contents SET min_x = ?, max_x = ?, min_y = ?, max_y = ? WHERE table_name = ?",
                        (*(float(f"{v:.16g}") for v in extent), table))
        for _, sql in triggers:
            con.execute(sql)
        now = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')"
        con.execute(f"UPDATE gpkg_contents SET last_change = {now} WHERE table_name = ?", (table,))
        if metadata is not None:
            con.execute("UPDATE gpkg_metadata SET metadata = replace(metadata, ?, ?)",
                        (_xml_text(metadata[0]), _xml_text(metadata[1])))
            con.execute(f"UPDATE gpkg_metadata_reference SET timestamp = {now} WHERE table_name = ?", (table,))
        con.execute("COMMIT")
    finally:
        con.close()


class _IndexHelper:
    """``python -m tilescan.outputs.gpkg --serve``: indexes the files named on its stdin, one
    per line, answering ``<exit code> <message>`` per file; ends with this process."""

    def __init__(self):
        self.proc: subprocess.Popen | None = None
        self.started_with: tuple | None = None  # the environment it was started in
        self.lock = threading.Lock()

    def _start(self) -> subprocess.Popen:
        from .workers import child_env

        return subprocess.Popen([sys.executable, "-m", "tilescan.outputs.gpkg", "--serve"], env=child_env(), text=True,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=1)

    def _ensure(self, env: tuple) -> None:
        """A running helper started in ``env`` (called with the lock held): one that died or
        was started in another environment (e.g. a caller changed PYTHONPATH) is replaced."""
        if self.proc is None or self.proc.poll() is not None or self.started_with != env:
            self.close()
            self.proc, self.started_with = self._start(), env

    def start(self) -> None:
        """Start the helper now, if none runs, without waiting for it to be ready: its
        interpreter starts while this process does other work, not when the first file waits."""
        with self.lock:
            self._ensure(self._env())

    @staticmethod
    def _env() -> tuple:
        return sys.executable, os.environ.get("PYTHONPATH"), os.environ.get("PATH")

    def index(self, path: Path) -> tuple[int, str]:
        env = self._env()
        with self.lock:
            for _ in range(2):  # a helper that died (killed, out of memory) is started again once
                try:
                    self._ensure(env)
                except OSError as exc:  # this interpreter cannot be run again (replaced, or not the user's to run)
                    return 1, f"the indexing helper could not start: {sys.executable}: {exc.strerror or exc}"
                try:
                    self.proc.stdin.write(str(Path(path).resolve()) + "\n")
                    self.proc.stdin.flush()
                    line = self.proc.stdout.readline()
                except (BrokenPipeError, OSError):
                    line = ""
                if line:
                    code, _, why = line.rstrip("\n").partition(" ")
                    return int(code), why
                self.proc = None
            return 1, "the indexing helper process stopped"


    def close(self) -> None:
        """End the helper (at exit): it stops when its stdin closes."""
        proc, self.proc = self.proc, None
        if proc is not None:
            for f in (proc.stdin, proc.stdout):
                try:
                    f.close()
                except OSError:
                    pass
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()


_helper = _IndexHelper()
atexit.register(_helper.close)


def warm_up() -> None:
    """Load what the first GeoPackage of a process needs (GDAL's writer, ``pyogrio``, with
    pandas where installed; the index helper when this process's SQLite has no R-tree
    module), so that a run's first scene does not wait for it at its end."""
    importlib.import_module("pyogrio")
    if not _sqlite_has_rtree():
        _helper.start()


def connect_read_only(path: str | os.PathLike) -> sqlite3.Connection:
    """SQLite on ``path``, read only: a ``file:`` URI with the path percent-encoded, so that a
    ``#``, ``?`` or ``%`` in a folder name is part of the name, not of the URI."""
    return sqlite3.connect(Path(path).absolute().as_uri() + "?mode=ro", uri=True)


def has_rtree(path: str | os.PathLike) -> bool:
    """Whether every feature table of the GeoPackage ``path`` has a registered R-tree
    (read with plain SQL: the R-tree module is not needed)."""
    con = connect_read_only(path)
    try:
        tables = con.execute("SELECT table_name, column_name FROM gpkg_geometry_columns").fetchall()
        names = {r[0] for r in con.execute("SELECT name FROM sqlite_master")}
        ext = set()
        if "gpkg_extensions" in names:
            ext = set(con.execute("SELECT table_name, column_name FROM gpkg_extensions "
                                  "WHERE extension_name = 'gpkg_rtree_index'").fetchall())
    finally:
        con.close()
    return bool(tables) and all((t, g) in ext and f"rtree_{t}_{g}" in names for t, g in tables)


def _serve() -> int:
    """Index each file named on stdin; one answer line per file (see :class:`_IndexHelper`)."""
    for line in sys.stdin:
        path = line.rstrip("\n")
        if not _sqlite_has_rtree():
            answer = f"{_NO_RTREE} the SQLite of {sys.executable} ({sqlite3.sqlite_version}) has no R-tree module"
        else:
            try:
                _index_in_process(Path(path))
                answer = "0 ok"
            except (sqlite3.Error, ValueError, OSError) as exc:
                answer = f"1 {path}: {exc}".replace("\n", " ")
        print(answer, flush=True)
    return 0


def _main(argv: list[str]) -> int:
    if argv == ["--serve"]:
        return _serve()
    if len(argv) != 1:
        print("usage: python -m tilescan.outputs.gpkg FILE.gpkg", file=sys.stderr)
        return 2
    if not _sqlite_has_rtree():
        print(f"the SQLite of {sys.executable} ({sqlite3.sqlite_version}) has no R-tree module", file=sys.stderr)
        return _NO_RTREE
    try:
        _index_in_process(Path(argv[0]))
    except (sqlite3.Error, ValueError) as exc:
        print(f"{argv[0]}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
