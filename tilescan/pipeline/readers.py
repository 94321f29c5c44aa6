"""Reader processes: the overlap pipeline's reads (decoding and scaling) outside the run's
process, so they do not take turns on Python's GIL with the model's thread and the writer.

With ``[inference] reader_processes = true`` each reader lane of :mod:`~tilescan.pipeline.stream`
hands its chunks of tiles to its own child (``python -m tilescan.pipeline.readers``, started
like the output helpers of :mod:`tilescan.outputs.workers`, for the same reasons). The child
gets the scene's :class:`~tilescan.scene.reader.SceneReader` once (pickled: the grid, bands,
masks and stretch, no handles), reads each chunk exactly as the reader would in the run, and
writes the model input and the valid masks into memory it shares with the run (anonymous
shared files, each handed over the socket once), where the batch takes them: no copy on the
way back, and the lane's thread waits without the GIL. The quicklook's samples it took from
the windows come back in its answer. The scenes open in one more child (the opener's lane,
-1): its checks, stretch sample and empty-block scan; the reader comes back pickled with what
it holds (a small scene whole), and its tiling warnings are issued again in the run.

Only local files not held in memory go to a child: a small scene's reads come from memory
and a remote one's from the run's own connection, on the lane's thread as before. A child
ignores SIGINT and SIGTERM (the run decides how to stop) and ends when its socket closes.
"""

from __future__ import annotations

import itertools
import math
import mmap
import os
import pickle
import socket
import struct
import subprocess
import sys
import threading
from typing import Any, Callable

import numpy as np

from ..outputs.workers import child_env, close_all, helper_start, portable_error, wait_or_kill
from ..scene.decimate import pick
from ..scene.grid import TileSet
from ..scene.info import collecting_tiling_warnings, tiling_warning
from ..scene.reader import SceneReader
from .memory import ArrayPool
from .threads import FINISH_NICE

__all__ = ["AVAILABLE", "ReaderDied", "ReaderProcesses", "lanes_ahead", "open_scene", "read_batch"]

_LEN = struct.Struct("<Q")
_MAX_FDS = 8  # shared buffers handed over with one message at most
_keys = itertools.count()
_lane = threading.local()
#: Shared anonymous files and file passing over sockets: Linux; elsewhere the lanes read on their threads.
AVAILABLE = hasattr(os, "memfd_create") and hasattr(socket, "send_fds")


class ReaderDied(RuntimeError):
    """A reader process ended while reading (killed, out of memory): the unit fails; the lane
    starts a fresh process for its next read."""


def _send(sock: socket.socket, obj: Any, fds: list[int] = ()) -> None:
    """One message (length, pickle); ``fds`` (open files) travel with its length."""
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    head = _LEN.pack(len(data))
    if fds:
        if socket.send_fds(sock, [head], list(fds)) != len(head):
            raise OSError("a short send of a message's length")
        sock.sendall(data)
    else:
        sock.sendall(head + data)


def _recv_into(sock: socket.socket, view: memoryview) -> None:
    got, n = 0, len(view)
    while got < n:
        k = sock.recv_into(view[got:], n - got, socket.MSG_WAITALL)
        if k == 0:
            raise EOFError("the reader process closed its socket")
        got += k


def _recv(sock: socket.socket) -> tuple[Any, list[int]]:
    """One message and the files that came with it."""
    head, fds = b"", []
    while len(head) < _LEN.size:
        part, got, _, _ = socket.recv_fds(sock, _LEN.size - len(head), _MAX_FDS)
        if not part:
            raise EOFError("the reader process closed its socket")
        head += part
        fds += got
    data = bytearray(_LEN.unpack(head)[0])
    _recv_into(sock, memoryview(data))
    return pickle.loads(data), fds


class _SharedMemory:
    """The model inputs' memory, shared with the reader processes: an :class:`ArrayPool` of
    anonymous shared files (``memfd``), each handed to a child with the first read that uses
    it, so the child writes the tiles where the model takes them (no copy on the way back)."""

    def __init__(self, keep: int):
        self._ids = itertools.count()
        self._files: dict[int, tuple[int, int]] = {}  # buffer address -> (id, file)
        self.dropped: list[int] = []  # ids of buffers gone, in order (appended without a lock)
        self.pool = ArrayPool(keep=keep, make=self._make, dropped=self._drop)

    def _make(self, n: int) -> np.ndarray:
        fd = os.memfd_create("tilescan-batch", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, n)
            buf = np.frombuffer(mmap.mmap(fd, n), dtype=np.uint8)
        except BaseException:
            os.close(fd)
            raise
        self._files[buf.ctypes.data] = (next(self._ids), fd)
        return buf

    def _drop(self, buf: np.ndarray) -> None:  # from a lease's __del__: no lock taken
        bid, fd = self._files.pop(buf.ctypes.data)
        os.close(fd)
        self.dropped.append(bid)

    def take(self, nbytes: int) -> tuple[np.ndarray, int, int]:
        """A shared uint8 array of ``nbytes``, its buffer's id and file."""
        raw = self.pool.empty((nbytes,), np.uint8)
        return (raw, *self._files[raw.ctypes.data])

    def close(self) -> None:
        self.pool.clear()


class _Child:
    """One reader process and the run's end of its socket (used by one lane thread at a time)."""

    def __init__(self, memory: _SharedMemory, nice: int = 0):
        from .run import GDAL_CACHE_MB

        env = child_env()
        env.setdefault("GDAL_CACHEMAX", str(GDAL_CACHE_MB))  # in MB: the bound the run's own process has
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            argv = [sys.executable, "-m", "tilescan.pipeline.readers", str(theirs.fileno()), str(nice)]
            self.proc = subprocess.Popen(argv, env=env, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        finally:
            theirs.close()
        self.sock, self.memory = ours, memory
        self.known: set[int] = set()  # the readers it holds
        self.forget: list[int] = []  # readers it may drop, told with the next read
        self.buffers: set[int] = set()  # the shared buffers it has
        self.dropped_seen = len(memory.dropped)

    def read(self, reader: SceneReader, tiles: TileSet) -> tuple[np.ndarray, np.ndarray]:
        if reader.process_key is None:
            reader.process_key = next(_keys)
        key = reader.process_key
        state = None if key in self.known else pickle.dumps(reader, protocol=pickle.HIGHEST_PROTOCOL)
        preview = reader._preview
        view = (preview.rows, preview.cols) if preview is not None and key not in self.known else None
        forget, self.forget = self.forget, []
        t, s = reader.tile_px, reader.input_size
        xshape, vshape = (len(tiles), s, s, len(reader.bands)), (len(tiles), t, t)
        xbytes = math.prod(xshape) * 4
        raw, bid, fd = self.memory.take(xbytes + math.prod(vshape))
        gone = self.memory.dropped[self.dropped_seen:]
        self.dropped_seen += len(gone)
        gone = [b for b in gone if b in self.buffers]
        self.buffers.difference_update(gone)
        new = bid not in self.buffers
        windows, pixels, picked = self.call(
            ("read", (forget, gone, key, state, view, tiles.row, tiles.col, bid, xbytes)), [fd] if new else [],
            sent=lambda: (self.known.add(key), self.buffers.add(bid)))
        with reader._lock:
            reader.windows_read += windows
            reader.pixels_read += pixels
        if preview is not None:
            for p in picked:
                preview.put(p)
        return raw[:xbytes].view(np.float32).reshape(xshape), raw[xbytes:].view(bool).reshape(vshape)

    def call(self, msg: tuple, fds: list[int] = (), sent: Callable[[], Any] | None = None,
             what: str = "the reader process") -> Any:
        """Send ``msg`` (and ``fds``), call ``sent()`` once it is sent, and return the child's
        answer, or raise its error; :class:`ReaderDied` when the child is gone."""
        try:
            _send(self.sock, msg, fds)
            if sent is not None:
                sent()
            (ok, got), _ = _recv(self.sock)
        except (OSError, EOFError) as exc:
            raise ReaderDied(f"{what} stopped (exit status {self.proc.poll()})") from exc
        if not ok:
            raise got
        return got

    def alive(self) -> bool:
        return self.proc.poll() is None

    def end(self) -> None:
        """Tell the child to end: it does at the end of its socket."""
        self.sock.close()

    def close(self) -> None:
        self.end()
        wait_or_kill(self.proc)


class ReaderProcesses:
    """One reader process per lane, started when first asked for (:meth:`start` starts some
    ahead, while the model loads), and one that opens the scenes (lane -1, the opener's). A
    lane's thread calls :meth:`bind` once; then :func:`read_batch` and :func:`open_scene` on
    that thread go through the lane's process. Off (``enabled`` False): binding does nothing."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled and AVAILABLE
        self._children: dict[int, _Child] = {}
        self._lock = threading.Lock()
        self._closed = False
        self.memory = _SharedMemory(keep=4)

    @classmethod
    def for_run(cls, inference) -> "ReaderProcesses":
        """A run's reader processes, off unless its ``[inference]`` settings ask for them; then
        the scenes' opener and the lanes likely needed (:func:`lanes_ahead`) start now, while
        Keras and the model load."""
        procs = cls(inference.reader_processes)
        if procs.enabled:
            procs._child(-1)
            procs.start(lanes_ahead(inference))
        return procs

    def start(self, n: int) -> None:
        """Have lanes 0 .. n-1 each a process (started now), and no others but the opener's."""
        if not self.enabled:
            return
        self.memory.pool.keep = n + 4  # a free buffer for each lane, and some
        for lane in range(n):
            self._child(lane)
        with self._lock:
            extra = [self._children.pop(k) for k in [k for k in self._children if k >= n]]
        for child in extra:
            child.close()

    def _child(self, lane: int) -> _Child:
        with self._lock:
            if self._closed:
                raise RuntimeError("the reader processes are closed")
            child = self._children.get(lane)
            if child is None or not child.alive():
                if child is not None:
                    child.close()
                child = self._children[lane] = _Child(self.memory, nice=FINISH_NICE if lane < 0 else 0)
            return child

    def bind(self, lane: int) -> None:
        """Have this thread read (open: lane -1) through lane ``lane``'s process (a lane's
        initializer); nothing when off."""
        if self.enabled:
            _lane.procs, _lane.index = self, lane

    def forget(self, reader: SceneReader) -> None:
        """Every tile of ``reader`` is read: the processes may drop their copy of it."""
        key = reader.process_key
        if key is None:
            return
        with self._lock:
            for child in self._children.values():
                if key in child.known:
                    child.known.discard(key)
                    child.forget.append(key)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            children, self._children = list(self._children.values()), {}
        close_all(children)
        self.memory.close()


def lanes_ahead(inference) -> int:
    """Reader processes worth starting before the engine is made, while Keras and the model
    load (``inference``: the run's ``[inference]`` settings): the overlap pipeline's readers
    when it is set, or likely (``auto`` on a host with NVIDIA device files); else 0."""
    if not (inference.reader_processes and AVAILABLE) or inference.pipeline == "lockstep":
        return 0
    from ..backend import gpu_device_files, usable_cores

    if inference.pipeline == "auto" and not gpu_device_files():
        return 0
    return usable_cores() if inference.reader_threads == "auto" else int(inference.reader_threads)


def open_scene(card, scene, tiling) -> SceneReader:
    """``card.open_scene(scene, tiling)`` (``card``: the model's :class:`~tilescan.model.LoadedModel`),
    in this thread's process when it has one (the opener's, :meth:`ReaderProcesses.bind`) and
    the scene is a local file (not remote): its stretch sample is decoded and counted there, and
    the reader comes back with what it holds (a small scene whole), its tiling warnings issued
    again here."""
    procs = getattr(_lane, "procs", None)
    if procs is None or getattr(scene, "remote", False) or not os.path.isfile(scene):
        return card.open_scene(scene, tiling)
    args = (scene, card.tiling_for(tiling), *card.scene_args())
    reader, decimated, warned = procs._child(_lane.index).call(("open", args), what=f"the process opening {scene}")
    reader._decimated = decimated
    for w in warned:
        tiling_warning(**w)
    return reader


def read_batch(reader: SceneReader, tiles: TileSet, empty: Callable = np.empty,
               remote: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``reader.read_batch(tiles, empty)``, through this thread's reader process when it has one
    (:meth:`ReaderProcesses.bind`) and the scene is a local file (not ``remote``: a URL or a STAC
    item, whose path may be a local VRT of remote files) not held in memory (then in memory
    shared with the process, not from ``empty``)."""
    procs = getattr(_lane, "procs", None)
    if procs is None or remote or reader.holds_whole() or not os.path.isfile(reader.info.path):
        return reader.read_batch(tiles, empty)
    return procs._child(_lane.index).read(reader, tiles)


# -- the child -------------------------------------------------------------------------


class _Picks:
    """Stands in for a reader's preview in the child: keeps what each window gives it."""

    def __init__(self, rows: np.ndarray, cols: np.ndarray):
        self.rows, self.cols, self.picked = rows, cols, []

    def take(self, window, data: np.ndarray, valid: np.ndarray) -> None:
        p = pick(self.rows, self.cols, window, data, valid)
        if p is not None:
            self.picked.append(p)


def _open(scene, tiling, *args) -> tuple:
    """The opener's work in the child: the reader and its tiling warnings."""
    from ..scene.plan import open_scene as _open_scene

    with collecting_tiling_warnings() as caught:
        reader = _open_scene(scene, tiling, *args)
    return reader, list(caught)


def _serve(fd: int, nice: int) -> int:
    helper_start(nice)
    sock = socket.socket(fileno=fd)
    readers: dict[int, tuple[SceneReader, _Picks | None]] = {}
    buffers: dict[int, np.ndarray] = {}  # the run's shared buffers, by id
    while True:
        try:
            (kind, msg), fds = _recv(sock)
        except (EOFError, OSError):
            return 0
        opened = None
        try:
            if kind == "open":  # the reader travels without its handles, what it holds beside it
                opened, warned = _open(*msg)
                reply = (True, (opened, opened._decimated, warned))
            else:
                reply = (True, _read(readers, buffers, msg, fds))
        except BaseException as exc:  # noqa: BLE001 - handed back to the run
            reply = (False, portable_error(exc, "the reader process"))
        try:
            _send(sock, reply)
        except OSError:
            return 0
        finally:
            if opened is not None:
                opened.close()


def _read(readers: dict, buffers: dict, msg: tuple, fds: list[int]) -> tuple:
    """A lane's read in the child, into the shared buffer; its counts and preview samples."""
    forget, gone, key, state, view, row, col, bid, xbytes = msg
    for k in forget:
        if k in readers:
            readers.pop(k)[0].close()
    for b in gone:
        buffers.pop(b, None)  # unmapped with its last array
    for f in fds:  # the buffer this read writes into, new to this process
        buffers[bid] = np.frombuffer(mmap.mmap(f, 0), dtype=np.uint8)
        os.close(f)
    if state is not None:  # kept until the run says every tile of it is read
        readers[key] = (pickle.loads(state), None if view is None else _Picks(*view))
    reader, picks = readers[key]
    reader._preview = picks
    w0, p0 = reader.windows_read, reader.pixels_read
    raw = buffers[bid]

    def into(shape, dtype):
        return raw[:xbytes].view(dtype).reshape(shape)

    x, valid = reader.read_batch(TileSet(reader.grid, row, col), into)
    raw[xbytes:xbytes + valid.size].view(bool).reshape(valid.shape)[...] = valid
    picked = picks.picked if picks is not None else []
    if picks is not None:
        picks.picked = []
    return reader.windows_read - w0, reader.pixels_read - p0, picked


if __name__ == "__main__":
    sys.exit(_serve(int(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 0))
